//! PNG plots with plotters: text in Ubuntu Light, the font egui ships (`epaint_default_fonts`),
//! registered once, so plots need no system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::{EvalError, Result};

const FONT: &str = "sans-serif";

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font(FONT, style, epaint_default_fonts::UBUNTU_LIGHT)
                .map_err(|_| ())
                .expect("egui's bundled font parses");
        }
    });
}

fn err(path: &Path, e: impl std::fmt::Display) -> EvalError {
    EvalError::Plot {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// A colour for a series, from a fixed palette.
pub fn colour(i: usize) -> RGBColor {
    const P: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    P[i % P.len()]
}

/// One heatmap panel: accuracy per (length, depth) cell, (correct, total).
pub struct Heatmap {
    pub title: String,
    pub lengths: Vec<usize>,
    pub depths: Vec<String>,
    /// cells[depth][length]; None = not run.
    pub cells: Vec<Vec<Option<(usize, usize)>>>,
}

fn ramp(a: f64) -> RGBColor {
    let lerp = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * a).round() as u8;
    RGBColor(lerp(215, 40), lerp(48, 160), lerp(39, 70))
}

/// Characters of a heatmap panel's title line (18-pixel type across a 330-pixel panel).
const TITLE_CHARS: usize = 34;
/// Pixels of one title line.
const TITLE_LINE: u32 = 21;

/// A panel title broken into lines of at most `width` characters, between a method's knobs
/// (after `+` or `:`) where it can be, else anywhere.
pub fn wrap_title(title: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut pieces: Vec<String> = vec![];
    let mut cur = String::new();
    for ch in title.chars() {
        cur.push(ch);
        if ch == '+' || ch == ':' {
            pieces.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        pieces.push(cur);
    }
    let mut lines: Vec<String> = vec![];
    let mut line = String::new();
    for piece in pieces {
        if !line.is_empty() && line.chars().count() + piece.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        line.push_str(&piece);
        // A single knob wider than a line is cut where it must be.
        while line.chars().count() > width {
            let head: String = line.chars().take(width).collect();
            line = line.chars().skip(width).collect();
            lines.push(head);
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// Heatmaps (depth × length, green = every key found) side by side, one per method; long
/// method names are wrapped over several title lines.
pub fn heatmaps(path: &Path, title: &str, panels: &[Heatmap]) -> Result<()> {
    font();
    if panels.is_empty() {
        return Ok(());
    }
    let cols = panels.len().min(4);
    let rows = panels.len().div_ceil(cols);
    let titles: Vec<Vec<String>> = panels
        .iter()
        .map(|p| wrap_title(&p.title, TITLE_CHARS))
        .collect();
    let title_lines = titles.iter().map(Vec::len).max().unwrap_or(1).max(1) as u32;
    let head = TITLE_LINE * title_lines + 8;
    let (w, h) = (330 * cols as u32, (280 + head) * rows as u32 + 50);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let root = root.titled(title, (FONT, 24)).map_err(|e| err(path, e))?;
    let areas = root.split_evenly((rows, cols));
    for ((p, lines), area) in panels.iter().zip(&titles).zip(areas.iter()) {
        let nx = p.lengths.len();
        let ny = p.depths.len();
        let (top, area) = area.split_vertically(head);
        let centre = top.dim_in_pixel().0 as i32 / 2;
        let style = TextStyle::from((FONT, 18).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (k, line) in lines.iter().enumerate() {
            top.draw_text(line, &style, (centre, 4 + (k as u32 * TITLE_LINE) as i32))
                .map_err(|e| err(path, e))?;
        }
        // Cell (i, j) is the unit square centred on (i, j); asking for 2n + 1 labels makes the
        // tick step at most ½, so every centre gets a tick, and the formatter names only those.
        let mut chart = ChartBuilder::on(&area)
            .margin(8)
            .x_label_area_size(42)
            .y_label_area_size(48)
            .build_cartesian_2d(-0.5..nx as f64 - 0.5, -0.5..ny as f64 - 0.5)
            .map_err(|e| err(path, e))?;
        let lengths = p.lengths.clone();
        let depths = p.depths.clone();
        let at = |v: f64, n: usize| {
            let i = v.round();
            ((v - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n).then_some(i as usize)
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("prompt length (tokens)")
            .y_desc("needle depth")
            .x_labels(2 * nx + 1)
            .y_labels(2 * ny + 1)
            .x_label_formatter(&|v| {
                at(*v, nx).map_or(String::new(), |i| fmt_num(lengths[i] as f64))
            })
            .y_label_formatter(&|v| at(*v, ny).map_or(String::new(), |i| depths[i].clone()))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 14))
            .draw()
            .map_err(|e| err(path, e))?;
        for (j, row) in p.cells.iter().enumerate() {
            for (i, cell) in row.iter().enumerate() {
                let (fill, text, ink) = match cell {
                    Some((ok, n)) if *n > 0 => {
                        (ramp(*ok as f64 / *n as f64), format!("{ok}/{n}"), WHITE)
                    }
                    _ => (RGBColor(235, 235, 235), "not run".to_string(), BLACK),
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [
                            (i as f64 - 0.5, j as f64 - 0.5),
                            (i as f64 + 0.5, j as f64 + 0.5),
                        ],
                        fill.filled(),
                    )))
                    .map_err(|e| err(path, e))?;
                let style = TextStyle::from((FONT, 16).into_font())
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                chart
                    .draw_series(std::iter::once(Text::new(
                        text,
                        (i as f64, j as f64),
                        style,
                    )))
                    .map_err(|e| err(path, e))?;
            }
        }
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// A line series: name and (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// One line-chart panel.
pub struct Lines {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
    /// y range; None = from the data.
    pub y_range: Option<(f64, f64)>,
}

/// Line charts side by side, with a legend in each.
pub fn lines(path: &Path, title: &str, panels: &[Lines]) -> Result<()> {
    font();
    let cols = panels.len().max(1);
    let root = BitMapBackend::new(path, (620 * cols as u32, 470)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let root = root.titled(title, (FONT, 24)).map_err(|e| err(path, e))?;
    for (p, area) in panels.iter().zip(root.split_evenly((1, cols)).iter()) {
        let pts = p.series.iter().flat_map(|s| s.1.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts.filter(|(x, y)| x.is_finite() && y.is_finite()) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (1.0, 2.0, 0.0, 1.0);
        }
        if let Some(r) = p.y_range {
            (y0, y1) = r;
        }
        if x1 <= x0 {
            x1 = x0 * 2.0 + 1.0;
        }
        if y1 <= y0 {
            y1 = y0 + 1.0;
        }
        let (ylo, yhi) = if p.log_y {
            (y0 * 0.8, y1 * 1.25)
        } else {
            (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
        };
        let (xlo, xhi) = if p.log_x {
            (x0 / 1.15, x1 * 1.15)
        } else {
            (x0, x1)
        };
        // A log x axis gets a label at each power of two only (lengths): asking for as many
        // labels as it has powers keeps plotters from adding unround ones in between.
        let x_labels = if p.log_x {
            ((xhi / xlo).log2().floor() as usize).max(1)
        } else {
            10
        };
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&p.title, (FONT, 18))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_labels(x_labels)
                    .x_desc(p.x_desc.as_str())
                    .y_desc(p.y_desc.as_str())
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 15))
                    .x_label_formatter(&|x: &f64| fmt_num(*x))
                    .y_label_formatter(&|y: &f64| fmt_num(*y))
                    .draw()
                    .map_err(|e| err(path, e))?;
                for (k, (name, pts)) in p.series.iter().enumerate() {
                    let c = colour(k);
                    let pts: Vec<(f64, f64)> = pts
                        .iter()
                        .copied()
                        .filter(|(x, y)| x.is_finite() && y.is_finite())
                        .map(|(x, y)| (x, y.clamp(ylo, yhi)))
                        .collect();
                    chart
                        .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                        .map_err(|e| err(path, e))?
                        .label(name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                        });
                    if pts.len() <= 12 {
                        chart
                            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                            .map_err(|e| err(path, e))?;
                    }
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FONT, 14))
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(|e| err(path, e))?;
            }};
        }
        match (p.log_x, p.log_y) {
            (true, true) => draw!(
                builder
                    .build_cartesian_2d((xlo..xhi).log_scale().base(2.0), (ylo..yhi).log_scale())
                    .map_err(|e| err(path, e))?
            ),
            (true, false) => draw!(
                builder
                    .build_cartesian_2d((xlo..xhi).log_scale().base(2.0), ylo..yhi)
                    .map_err(|e| err(path, e))?
            ),
            (false, true) => draw!(
                builder
                    .build_cartesian_2d(xlo..xhi, (ylo..yhi).log_scale())
                    .map_err(|e| err(path, e))?
            ),
            (false, false) => draw!(
                builder
                    .build_cartesian_2d(xlo..xhi, ylo..yhi)
                    .map_err(|e| err(path, e))?
            ),
        }
    }
    root.present().map_err(|e| err(path, e))?;
    Ok(())
}

/// 4096 → "4K", 1.5 → "1.5", 12.0 → "12".
pub fn fmt_num(x: f64) -> String {
    if x >= 1024.0 && (x / 1024.0).fract().abs() < 1e-9 {
        format!("{}K", (x / 1024.0) as i64)
    } else if x.abs() >= 100.0 || x.fract().abs() < 1e-9 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_png_files_of_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let hm = dir.path().join("hm.png");
        heatmaps(
            &hm,
            "passkey",
            &[Heatmap {
                title: "homer".into(),
                lengths: vec![4096, 8192],
                depths: vec!["0.10".into(), "0.50".into()],
                cells: vec![vec![Some((1, 2)), None], vec![Some((2, 2)), Some((0, 3))]],
            }],
        )
        .unwrap();
        let li = dir.path().join("li.png");
        lines(
            &li,
            "cost",
            &[Lines {
                title: "time".into(),
                x_desc: "tokens".into(),
                y_desc: "s".into(),
                log_x: true,
                log_y: true,
                series: vec![
                    ("plain".into(), vec![(4096.0, 10.0), (8192.0, 40.0)]),
                    ("homer".into(), vec![(4096.0, 9.0), (8192.0, 20.0)]),
                ],
                y_range: None,
            }],
        )
        .unwrap();
        // One title line: 280 + 21 + 8 pixels of panel, 50 of figure title.
        for (p, w, h) in [(hm, 330, 359), (li, 620, 470)] {
            let img = image_size(&p);
            assert_eq!(img, (w, h), "{}", p.display());
        }
        assert_eq!(fmt_num(4096.0), "4K");
        // Long method names break between knobs, never past the width.
        let name = "homer:unit=sentence+reread=all+prior=lexical+order=prior-first+budget=640";
        let lines = wrap_title(name, TITLE_CHARS);
        assert_eq!(lines.concat(), name);
        assert_eq!(
            lines,
            [
                "homer:unit=sentence+reread=all+",
                "prior=lexical+order=prior-first+",
                "budget=640"
            ]
        );
        assert!(
            wrap_title("x".repeat(70).as_str(), 34)
                .iter()
                .all(|l| l.len() <= 34)
        );
        assert_eq!(wrap_title("homer", 34), ["homer"]);
        assert_eq!(fmt_num(12.0), "12");
        assert_eq!(fmt_num(3.25), "3.2");
    }

    /// Width and height from a PNG's IHDR chunk.
    fn image_size(p: &Path) -> (u32, u32) {
        let b = std::fs::read(p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (be(16), be(20))
    }
}
