//! The model's own chat template (`tokenizer.chat_template`), rendered with minijinja the way
//! transformers and TGI render it (trim_blocks, lstrip_blocks, Python string methods).

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("tokenizer.chat_template does not parse: {e}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The prompt for `messages`, ending with the assistant's turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| {
                // A template's own raise_exception carries the message meant for the user.
                let detail = e.detail().map_or_else(|| e.to_string(), str::to_string);
                format!("the chat template refused these messages: {detail}")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_chatml_with_python_methods_and_exceptions() {
        let source = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}\
            {{ raise_exception('bad role ' + m.role) }}{% endif %}\
            <|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}\
            {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[msg("user", "  hi  ")]).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = t.render(&[msg("wizard", "x")]).unwrap_err();
        assert!(err.contains("bad role wizard"), "{err}");
    }
}
