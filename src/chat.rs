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
    #[error(transparent)]
    Tokenize(#[from] ModelError),
}

/// Render one user message (after an optional system message) with `template`, adding the
/// assistant generation prompt, exactly as transformers' `apply_chat_template` would.
pub fn render_template(
    template: &str,
    system: Option<&str>,
    user: &str,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, minijinja::Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)?;
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(context! { role => "system", content => s });
    }
    messages.push(context! { role => "user", content => user });
    env.get_template("chat")?.render(context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    })
}

/// The model's chat template, rendered for one prompt.
pub fn render_chat(model: &Model, system: Option<&str>, user: &str) -> Result<String, ChatError> {
    let template = model
        .meta("tokenizer.chat_template")
        .ok_or(ChatError::NoTemplate)?;
    let bos = model.token_piece(model.bos());
    let eos = model.token_piece(model.eos());
    render_template(&template, system, user, &bos, &eos).map_err(ChatError::Render)
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
    fn raise_exception_is_an_error() {
        let t = "{{ raise_exception('no system role') }}";
        let e = render_template(t, None, "x", "", "").unwrap_err();
        assert!(format!("{e:#}").contains("no system role"));
    }
}
