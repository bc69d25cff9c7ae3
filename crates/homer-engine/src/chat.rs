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
        bos: String,
        eos: String,
    },
    Builtin(BuiltinTemplate),
}

impl ChatTemplate {
    /// The template a model's metadata names, or ChatML when it names none.
    pub fn from_metadata(template: Option<&str>, bos: &str, eos: &str) -> Self {
        match template {
            Some(src) if !src.trim().is_empty() => ChatTemplate::Jinja {
                source: src.to_string(),
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
            ChatTemplate::Jinja { source, bos, eos } => {
                let mut env = minijinja::Environment::new();
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
                    .map_err(|e| EngineError::Template(format!("cannot parse: {e}")))?;
                let tmpl = env
                    .get_template("chat")
                    .map_err(|e| EngineError::Template(e.to_string()))?;
                tmpl.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => bos,
                    eos_token => eos,
                })
                .map_err(|e| EngineError::Template(format!("cannot render: {e}")))
            }
        }
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
