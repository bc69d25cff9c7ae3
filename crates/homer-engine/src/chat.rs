//! Chat prompts: the model's own Jinja template from its metadata when present (rendered with
//! minijinja plus Python-compatible string methods), else built-in ChatML or Llama-2 `[INST]`.

use serde::Serialize;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    ChatMl,
    Llama2,
}

#[derive(Debug, Clone)]
pub enum ChatTemplate {
    Jinja {
        source: String,
        /// Where the template came from (a file, or a GGUF file's key), for error messages.
        origin: String,
        bos: String,
        eos: String,
    },
    Builtin(BuiltinTemplate),
}

impl ChatTemplate {
    /// The template a model's metadata names, or ChatML when it names none.
    pub fn from_metadata(template: Option<&str>, bos: &str, eos: &str) -> Self {
        Self::from_source(template, "the model's chat template", bos, eos)
    }

    /// [`ChatTemplate::from_metadata`] naming where the template came from (`origin`, e.g. the
    /// file), which its errors then name.
    pub fn from_source(template: Option<&str>, origin: &str, bos: &str, eos: &str) -> Self {
        match template {
            Some(src) if !src.trim().is_empty() => ChatTemplate::Jinja {
                source: src.to_string(),
                origin: origin.to_string(),
                bos: bos.to_string(),
                eos: eos.to_string(),
            },
            _ => ChatTemplate::Builtin(BuiltinTemplate::ChatMl),
        }
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant speaks.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match self {
            ChatTemplate::Builtin(b) => Ok(render_builtin(*b, messages, add_generation_prompt)),
            ChatTemplate::Jinja {
                source,
                origin,
                bos,
                eos,
            } => {
                let fail = |what: String| EngineError::Template(format!("{origin}: {what}"));
                let mut env = minijinja::Environment::new();
                // A template is code from the model's files: bounded in steps and in output.
                env.set_fuel(Some(TEMPLATE_FUEL));
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |msg: String| -> std::result::Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            msg,
                        ))
                    },
                );
                env.add_template("chat", source)
                    .map_err(|e| fail(format!("cannot parse: {e}")))?;
                let tmpl = env.get_template("chat").map_err(|e| fail(e.to_string()))?;
                let content: usize = messages.iter().map(|m| m.content.len()).sum();
                let mut out = Capped {
                    out: Vec::new(),
                    cap: 2 * content + TEMPLATE_OUTPUT_SLACK,
                    over: false,
                };
                let rendered = tmpl.render_captured_to(
                    minijinja::context! {
                        messages => messages,
                        add_generation_prompt => add_generation_prompt,
                        bos_token => bos,
                        eos_token => eos,
                    },
                    &mut out,
                );
                if out.over {
                    return Err(fail(format!(
                        "it writes more than {} bytes for {} bytes of messages; a chat template \
                         repeats each message once",
                        out.cap, content
                    )));
                }
                rendered.map_err(|e| fail(format!("cannot render: {e}")))?;
                String::from_utf8(out.out).map_err(|e| fail(format!("not UTF-8: {e}")))
            }
        }
    }
}

/// Template steps (minijinja's fuel) a render may take: a chat template takes tens of steps a
/// message, so this allows hundreds of thousands of turns and stops a runaway loop in well under a
/// second.
const TEMPLATE_FUEL: u64 = 20_000_000;

/// Output a template may add beyond twice its messages' text (markers, system prompts).
const TEMPLATE_OUTPUT_SLACK: usize = 1 << 20;

/// A writer that refuses to grow past `cap` bytes (the render then fails).
struct Capped {
    out: Vec<u8>,
    cap: usize,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.cap {
            self.over = true;
            return Err(std::io::Error::other("the template's output is too long"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn render_builtin(t: BuiltinTemplate, messages: &[Message], add_generation_prompt: bool) -> String {
    let mut out = String::new();
    match t {
        BuiltinTemplate::ChatMl => {
            for m in messages {
                out.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                ));
            }
            if add_generation_prompt {
                out.push_str("<|im_start|>assistant\n");
            }
        }
        BuiltinTemplate::Llama2 => {
            // <s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] ...
            let mut system: Option<&str> = None;
            let mut first_user = true;
            for m in messages {
                match m.role.as_str() {
                    "system" => system = Some(&m.content),
                    "user" => {
                        out.push_str("<s>[INST] ");
                        if let (Some(s), true) = (system, first_user) {
                            out.push_str(&format!("<<SYS>>\n{s}\n<</SYS>>\n\n"));
                        }
                        out.push_str(&format!("{} [/INST]", m.content.trim()));
                        first_user = false;
                    }
                    _ => out.push_str(&format!(" {} </s>", m.content.trim())),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_and_llama2_builtins() {
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        let c = ChatTemplate::Builtin(BuiltinTemplate::ChatMl)
            .render(&msgs, true)
            .unwrap();
        assert_eq!(
            c,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let l = ChatTemplate::Builtin(BuiltinTemplate::Llama2)
            .render(&msgs, true)
            .unwrap();
        assert_eq!(l, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]");
    }

    #[test]
    fn jinja_template_renders_like_chatml() {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let t = ChatTemplate::from_metadata(Some(src), "", "<|im_end|>");
        let msgs = [Message::new("user", " Hi ")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let bad = ChatTemplate::from_metadata(Some("{% for %}"), "", "");
        assert!(
            bad.render(&msgs, true)
                .unwrap_err()
                .to_string()
                .contains("chat template")
        );
    }
}
