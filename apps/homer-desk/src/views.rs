//! The two views of a HOMER prefill: the merge tree (leaves = chunks at the bottom, merges above)
//! and the document text coloured by what survived to the final cache.

use std::ops::Range;
use std::sync::Arc;

use eframe::egui::{
    self, Align, Align2, Color32, FontId, Galley, Rect, Sense, Stroke, StrokeKind, Ui, Vec2,
    text::{CCursor, LayoutJob, TextFormat},
};
use homer::MergeTrace;

use crate::worker::Finished;

pub const KEPT: Color32 = Color32::from_rgb(46, 160, 67);
pub const DROPPED: Color32 = Color32::from_rgb(207, 74, 74);

/// The merge tree of `trace`; returns the node clicked this frame.
pub fn tree(ui: &mut Ui, run: &Finished, selected: Option<usize>) -> Option<usize> {
    let Some(trace) = &run.answer.trace else {
        ui.label("The whole prompt fit in the model's window: no merge tree (HOMER did not run).");
        return None;
    };
    ui.label(format!(
        "{} chunks, tree height {}, {} layers ({} warm-up), chunk length {}: {} context tokens -> {} rows in the final cache ({}).",
        trace.n_chunks,
        trace.height,
        trace.n_layers,
        trace.warmup_layers,
        trace.chunk_len,
        trace.context_len,
        trace.final_len,
        trace.scoring
    ));
    ui.label("Leaves (chunks) at the bottom, merges above. Hover a node for its document span; click to select it (the kept-token view then shows what that node kept).");
    let levels = trace.height + 1;
    let avail = ui.available_size();
    let size = Vec2::new(
        avail.x.max(300.0),
        (levels as f32 * 90.0).max(avail.y.min(600.0)),
    );
    let (area, _) = ui.allocate_exact_size(size, Sense::hover());
    let painter = ui.painter_at(area);
    let n = trace.n_chunks.max(1) as f32;
    let col_w = area.width() / n;
    let row_h = area.height() / levels as f32;
    let box_w = (col_w - 6.0).clamp(24.0, 150.0);
    let node_rect = |leaves: &Range<usize>, height: usize| {
        let cx = area.left() + (leaves.start + leaves.end) as f32 * 0.5 * col_w;
        let cy = area.top() + (trace.height - height) as f32 * row_h + row_h * 0.5;
        let w = (box_w * (leaves.len() as f32).sqrt()).min(leaves.len() as f32 * col_w - 6.0);
        Rect::from_center_size(egui::pos2(cx, cy), Vec2::new(w.max(24.0), 46.0))
    };
    let visuals = ui.visuals().clone();
    for node in &trace.nodes {
        if let Some(ch) = node.children {
            let r = node_rect(&node.leaves, node.height);
            for c in ch {
                let cn = &trace.nodes[c];
                let cr = node_rect(&cn.leaves, cn.height);
                painter.line_segment(
                    [r.center_bottom(), cr.center_top()],
                    Stroke::new(1.5, visuals.weak_text_color()),
                );
            }
        }
    }
    let mut clicked = None;
    for node in &trace.nodes {
        let r = node_rect(&node.leaves, node.height);
        let kind = if node.children.is_some() {
            "merge"
        } else {
            "leaf"
        };
        let label = format!("{kind} node {}", node.id);
        let resp = ui.interact(
            r,
            ui.scope_id().with(("tree-node", node.id)),
            Sense::click(),
        );
        resp.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, &label));
        let is_sel = selected == Some(node.id);
        let fill = if is_sel {
            visuals.selection.bg_fill
        } else if resp.hovered() {
            visuals.widgets.hovered.bg_fill
        } else {
            visuals.widgets.inactive.bg_fill
        };
        painter.rect_filled(r, 4.0, fill);
        let kept_share = node.rows_out as f32 / node.rows_in.max(1) as f32;
        // A bar along the bottom: the share of rows the node kept.
        let bar = Rect::from_min_size(
            r.left_bottom() - Vec2::new(0.0, 4.0),
            Vec2::new(r.width() * kept_share, 4.0),
        );
        painter.rect_filled(bar, 0.0, KEPT);
        painter.rect_stroke(
            r,
            4.0,
            Stroke::new(1.0, visuals.widgets.inactive.fg_stroke.color),
            StrokeKind::Inside,
        );
        let text = if r.width() >= 90.0 {
            format!(
                "L{}–{}\n{} -> {}",
                node.layers.start,
                node.layers.end.saturating_sub(1),
                node.rows_in,
                node.rows_out
            )
        } else {
            format!("{}", node.rows_out)
        };
        painter.text(
            r.center() - Vec2::new(0.0, 2.0),
            Align2::CENTER_CENTER,
            text,
            FontId::proportional(11.0),
            visuals.text_color(),
        );
        let resp = resp.on_hover_ui(|ui| {
            ui.label(format!(
                "{label}: chunks {}–{}, layers {}–{}, rows {} -> {} ({:.0}% kept)",
                node.leaves.start,
                node.leaves.end - 1,
                node.layers.start,
                node.layers.end.saturating_sub(1),
                node.rows_in,
                node.rows_out,
                kept_share * 100.0
            ));
            ui.label(span_text(run, &node.context, 300));
        });
        if resp.clicked() {
            clicked = Some(node.id);
        }
    }
    clicked
}

/// The document text of context tokens `span` (first document they fall in), cut to `max` chars.
pub fn span_text(run: &Finished, span: &Range<usize>, max: usize) -> String {
    let bytes = &run.token_bytes;
    if span.is_empty() || span.end > bytes.len() {
        return String::new();
    }
    let (k, a) = (bytes[span.start].0, bytes[span.start].1.start);
    let b = span
        .clone()
        .rev()
        .find(|&i| bytes[i].0 == k)
        .map_or(a, |i| bytes[i].1.end);
    let text = run.docs[k].text[a..b].trim();
    let cut: String = text.chars().take(max).collect();
    if cut.len() < text.len() {
        format!("“{cut}…”")
    } else {
        format!("“{cut}”")
    }
}

/// How each context token is shown in the kept-token view.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mark {
    /// In the final cache (or kept by the selected node), with a score level 0..=4.
    Kept(u8),
    /// Dropped (at the root's subtree, or by the selected node).
    Dropped,
    /// Not under the selected node, or dropped before it.
    Outside,
}

/// One mark per context token: the final cache when `node` is None, else that node's choice.
pub fn marks(trace: &MergeTrace, node: Option<usize>) -> Vec<Mark> {
    let scores = trace.last_scores();
    let finite: Vec<f32> = scores
        .iter()
        .flatten()
        .copied()
        .filter(|s| s.is_finite())
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &s| {
            (a.min(s), b.max(s))
        });
    let level = |i: usize| match scores[i] {
        Some(s) if s.is_finite() && hi > lo => (((s - lo) / (hi - lo)) * 4.0).round() as u8,
        _ => 4,
    };
    match node.and_then(|id| trace.nodes.get(id)) {
        None => {
            let kept = trace.kept_mask();
            (0..trace.context_len)
                .map(|i| {
                    if kept[i] {
                        Mark::Kept(level(i))
                    } else {
                        Mark::Dropped
                    }
                })
                .collect()
        }
        Some(n) => {
            let mut m = vec![Mark::Outside; trace.context_len];
            for &i in &n.kept {
                m[i] = Mark::Kept(level(i));
            }
            for &i in &n.dropped {
                m[i] = Mark::Dropped;
            }
            m
        }
    }
}

/// The text of document `doc` as a layout job, tokens coloured by `marks`.
pub fn kept_job(run: &Finished, doc: usize, marks: &[Mark], ui: &Ui, wrap: f32) -> LayoutJob {
    let bytes = &run.token_bytes;
    let text = &run.docs[doc].text;
    let font = FontId::monospace(12.0);
    let normal = ui.visuals().text_color();
    let weak = ui.visuals().weak_text_color();
    let fmt = |m: Option<Mark>| {
        let (color, background) = match m {
            Some(Mark::Kept(l)) => (normal, KEPT.gamma_multiply(0.25 + 0.15 * l as f32)),
            Some(Mark::Dropped) => (weak, DROPPED.gamma_multiply(0.18)),
            Some(Mark::Outside) | None => (weak, Color32::TRANSPARENT),
        };
        TextFormat {
            font_id: font.clone(),
            color,
            background,
            ..Default::default()
        }
    };
    let mut job = LayoutJob {
        text: text.clone(),
        ..Default::default()
    };
    job.wrap.max_width = wrap;
    let mut pos = 0usize;
    let mut cur: Option<(Option<Mark>, usize)> = None;
    let push = |job: &mut LayoutJob, m: Option<Mark>, r: Range<usize>| {
        if !r.is_empty() {
            job.sections.push(egui::text::LayoutSection {
                leading_space: 0.0,
                byte_range: egui::text::ByteIndex(r.start)..egui::text::ByteIndex(r.end),
                format: fmt(m),
            });
        }
    };
    for (i, (k, r)) in bytes.iter().enumerate() {
        if *k != doc || r.is_empty() || r.start < pos {
            continue;
        }
        let m = marks.get(i).copied();
        match cur {
            Some((cm, _)) if cm == m => {}
            Some((cm, start)) => {
                push(&mut job, cm, start..r.start);
                cur = Some((m, r.start));
            }
            None => {
                push(&mut job, None, pos..r.start);
                cur = Some((m, r.start));
            }
        }
        pos = r.end;
    }
    match cur {
        Some((cm, start)) => push(&mut job, cm, start..text.len()),
        None => push(&mut job, None, 0..text.len()),
    }
    job
}

/// Cached layout of the kept-token view (a 30K-token document is laid out once per change).
#[derive(Default)]
pub struct KeptView {
    key: Option<(usize, Option<usize>, u32, u64)>,
    galley: Option<Arc<Galley>>,
    /// Byte offset in the shown document to scroll to on the next frame.
    pub scroll_to: Option<usize>,
}

impl KeptView {
    pub fn show(
        &mut self,
        ui: &mut Ui,
        run: &Finished,
        doc: usize,
        node: Option<usize>,
        run_id: u64,
    ) {
        let Some(trace) = &run.answer.trace else {
            ui.label("The whole prompt fit in the model's window: every token was read, nothing was dropped.");
            return;
        };
        let wrap = ui.available_width().floor();
        let key = (doc, node, wrap as u32, run_id);
        if self.key != Some(key) || self.galley.is_none() {
            let m = marks(trace, node);
            let job = kept_job(run, doc, &m, ui, wrap);
            self.galley = Some(ui.painter().layout_job(job));
            self.key = Some(key);
        }
        let galley = self.galley.clone().expect("laid out above");
        let target = self.scroll_to.take();
        egui::ScrollArea::vertical()
            .id_salt("kept-text")
            .auto_shrink([false, false])
            .show(ui, |ui| {
                let resp = ui.add(egui::Label::new(galley.clone()).selectable(true));
                if let Some(at) = target {
                    let text = &run.docs[doc].text;
                    let at = at.min(text.len());
                    let chars = text[..at].chars().count();
                    let r = galley.pos_from_cursor(CCursor::new(chars));
                    let r = r
                        .translate(resp.rect.min.to_vec2())
                        .expand2(Vec2::new(0.0, 40.0));
                    ui.scroll_to_rect(r, Some(Align::Center));
                }
            });
    }
}
