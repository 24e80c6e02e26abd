//! Prompt rendering and tokenization.
//!
//! `--chat` renders prompts through the model's own Jinja chat template (`tokenizer.chat_template`)
//! with minijinja, configured as Hugging Face transformers configures jinja2 (`trim_blocks`,
//! `lstrip_blocks`, Python string methods). llama.cpp's `llama_chat_apply_template` is a built-in
//! matcher, not the model's template, and renders differently (SmolLM2's template adds a default
//! system prompt; the built-in chatml does not).

use minijinja::{context, Environment, Error, ErrorKind};

use crate::llama::model::{Model, ModelError};
use crate::llama::Token;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("--chat: this model has no chat template (tokenizer.chat_template is missing from the GGUF); trace raw prompts without --chat")]
    NoTemplate,
    #[error("--chat: the model's chat template failed: {0:#}")]
    Render(minijinja::Error),
    #[error("--chat: the model's chat template drops the {0} message (its rendering does not contain the text); trace raw prompts without --chat")]
    Dropped(&'static str),
    #[error(transparent)]
    Tokenize(#[from] ModelError),
}

/// Instructions a template may execute for one prompt (minijinja's fuel): real chat templates
/// take a few thousand; this stops a template that loops forever within a second.
const TEMPLATE_FUEL: u64 = 5_000_000;

/// Bytes a rendering may have beyond 8 × the messages' own size (a template that renders without
/// end is stopped here instead of filling memory).
const TEMPLATE_OUTPUT_SLACK: usize = 1 << 20;

/// A writer that fails once more than `left` bytes were written.
struct Bounded {
    buf: Vec<u8>,
    left: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() > self.left {
            return Err(std::io::Error::other("rendering too long"));
        }
        self.left -= b.len();
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Render one user message (after an optional system message) with `template`, adding the
/// assistant generation prompt, exactly as transformers' `apply_chat_template` would. The
/// rendering is bounded in work ([`TEMPLATE_FUEL`]) and size.
pub fn render_template(
    template: &str,
    system: Option<&str>,
    user: &str,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, minijinja::Error> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(("system".to_string(), s.to_string()));
    }
    messages.push(("user".to_string(), user.to_string()));
    render_conversation(template, &messages, bos_token, eos_token)
}

/// Render a conversation (`(role, content)` pairs, roles system/user/assistant) with
/// `template`, adding the assistant generation prompt, as transformers' `apply_chat_template`.
pub fn render_conversation(
    template: &str,
    conversation: &[(String, String)],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, minijinja::Error> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)?;
    let messages: Vec<_> = conversation
        .iter()
        .map(|(role, content)| context! { role => role, content => content })
        .collect();
    let limit =
        TEMPLATE_OUTPUT_SLACK + 8 * conversation.iter().map(|(_, c)| c.len()).sum::<usize>();
    let mut out = Bounded {
        buf: Vec::new(),
        left: limit,
    };
    env.get_template("chat")?
        .render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos_token,
                eos_token => eos_token,
            },
            &mut out,
        )
        .map(drop)
        .map_err(|e| {
            if out.left < 64 || e.kind() == ErrorKind::WriteFailure {
                Error::new(
                    ErrorKind::InvalidOperation,
                    format!("the rendering grew past {limit} bytes"),
                )
            } else {
                e
            }
        })?;
    String::from_utf8(out.buf)
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, "the rendering is not UTF-8"))
}

/// The model's chat template, rendered for one prompt.
pub fn render_chat(model: &Model, system: Option<&str>, user: &str) -> Result<String, ChatError> {
    let template = model
        .meta("tokenizer.chat_template")
        .ok_or(ChatError::NoTemplate)?;
    let bos = model.token_piece(model.bos());
    let eos = model.token_piece(model.eos());
    let text = render_template(&template, system, user, &bos, &eos).map_err(ChatError::Render)?;
    check_contains(&text, system, user)?;
    Ok(text)
}

/// The model's chat template, rendered for a conversation (`(role, content)` pairs).
pub fn render_messages(
    model: &Model,
    conversation: &[(String, String)],
) -> Result<String, ChatError> {
    let template = model
        .meta("tokenizer.chat_template")
        .ok_or(ChatError::NoTemplate)?;
    let bos = model.token_piece(model.bos());
    let eos = model.token_piece(model.eos());
    let text =
        render_conversation(&template, conversation, &bos, &eos).map_err(ChatError::Render)?;
    for (role, content) in conversation {
        if !text.contains(content.trim()) {
            return Err(ChatError::Dropped(if role == "system" {
                "system"
            } else {
                "user"
            }));
        }
    }
    Ok(text)
}

/// Refuse a rendering that silently dropped a message (templates may trim, so compare trimmed).
fn check_contains(rendered: &str, system: Option<&str>, user: &str) -> Result<(), ChatError> {
    if !rendered.contains(user.trim()) {
        return Err(ChatError::Dropped("user"));
    }
    if let Some(s) = system {
        if !rendered.contains(s.trim()) {
            return Err(ChatError::Dropped("system"));
        }
    }
    Ok(())
}

/// Tokenize a (raw or rendered) prompt like llama.cpp's CLI: special-token text is parsed, BOS/EOS
/// are added as the model's metadata says, and BOS is never doubled when the text already starts
/// with it (chat templates often emit it themselves).
pub fn tokenize_prompt(model: &Model, text: &str) -> Result<Vec<Token>, ModelError> {
    let mut toks = model.tokenize(text, true, true)?;
    let bos = model.bos();
    if model.add_bos() && toks.len() >= 2 && toks[0] == bos && toks[1] == bos {
        toks.remove(0);
    }
    Ok(toks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_hf_style_templates() {
        let t = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content.strip() }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
        let out = render_template(t, Some("sys"), " hi ", "<s>", "</s>").unwrap();
        assert_eq!(
            out,
            "<|system|>\nsys</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
        );
    }

    #[test]
    fn endless_or_lossy_templates_are_refused() {
        let loop_t =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let e = render_template(loop_t, None, "hi", "", "").unwrap_err();
        assert!(format!("{e:#}").contains("fuel"), "{e:#}");
        let big = format!(
            "{{% for i in range(100000) %}}{}{{% endfor %}}",
            "y".repeat(1000)
        );
        let e = render_template(&big, None, "hi", "", "").unwrap_err();
        assert!(format!("{e:#}").contains("grew past"), "{e:#}");
        let lossy = "<|user|>{{ add_generation_prompt }}";
        let out = render_template(lossy, None, "hello there", "", "").unwrap();
        assert!(matches!(
            check_contains(&out, None, "hello there"),
            Err(ChatError::Dropped("user"))
        ));
        let no_sys = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}";
        let out = render_template(no_sys, Some("be brief"), "hello", "", "").unwrap();
        assert!(matches!(
            check_contains(&out, Some("be brief"), "hello"),
            Err(ChatError::Dropped("system"))
        ));
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = "{{ raise_exception('no system role') }}";
        let e = render_template(t, None, "x", "", "").unwrap_err();
        assert!(format!("{e:#}").contains("no system role"));
    }
}
