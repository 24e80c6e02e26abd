//! Prompt sources: `-p TEXT` and prompt files (`.txt` one per line, `.jsonl` with text/label/id and
//! the target/foil tokens of `--attribution`).

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub id: String,
    pub label: Option<String>,
    pub text: String,
    /// Where it came from, for messages: "-p #2", "prompts/x.txt:7".
    pub source: String,
    /// The token whose logit `--attribution` decomposes (a .jsonl `target` field).
    pub target: Option<String>,
    /// The token whose logit is subtracted from the target's (a .jsonl `foil` field).
    pub foil: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{0}: cannot read prompt file: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: unknown prompt file type (use .txt, one prompt per line, or .jsonl)")]
    UnknownType(String),
    #[error("{0}: invalid JSON: {1}")]
    Json(String, String),
    #[error("{0}: missing string field \"text\"")]
    NoText(String),
    #[error("{0}: field \"{1}\" must be a string")]
    FieldType(String, &'static str),
    #[error("{0}: empty prompt")]
    Empty(String),
    #[error("{0}: holds no prompts")]
    NoPromptsInFile(String),
    #[error("duplicate prompt id \"{id}\" ({first} and {second})")]
    DuplicateId {
        id: String,
        first: String,
        second: String,
    },
    #[error("no prompts: give -p TEXT or -f FILE")]
    None,
}

/// Largest prompt file read (a prompt file is text; this stops `-f /dev/zero` from eating memory).
pub const MAX_PROMPT_FILE: u64 = 256 << 20;

/// Read a prompt file as UTF-8 text: a regular file (or a pipe) of at most [`MAX_PROMPT_FILE`].
fn read_bounded(path: &Path) -> std::io::Result<String> {
    // A pipe is a file's contents on its way (`-f <(…)` has no .txt name, but a named FIFO may).
    let mut bytes = crate::paths::read_bounded(path, MAX_PROMPT_FILE, true).map_err(|e| {
        if e.to_string().starts_with("larger than") {
            std::io::Error::other(format!("{e}; split it into several files"))
        } else {
            e
        }
    })?;
    // A UTF-8 byte-order mark (some editors write one) is not part of the first prompt.
    if bytes.starts_with(b"\xef\xbb\xbf") {
        bytes.drain(..3);
    }
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::other(format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Prompts from `-p` texts (in order) then files (in order). Ids must be unique.
pub fn collect(texts: &[String], files: &[impl AsRef<Path>]) -> Result<Vec<Prompt>, PromptError> {
    let mut out = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let source = format!("-p #{}", i + 1);
        if t.trim().is_empty() {
            return Err(PromptError::Empty(source));
        }
        out.push(Prompt {
            id: format!("p{i}"),
            label: None,
            text: t.clone(),
            source,
            target: None,
            foil: None,
        });
    }
    for f in files {
        out.extend(load_file(f.as_ref())?);
    }
    if out.is_empty() {
        return Err(PromptError::None);
    }
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for p in &out {
        if let Some(first) = seen.insert(&p.id, &p.source) {
            return Err(PromptError::DuplicateId {
                id: p.id.clone(),
                first: first.into(),
                second: p.source.clone(),
            });
        }
    }
    Ok(out)
}

/// Load one prompt file. The file's stem is the default label (so `-f paraphrases.txt -f
/// unrelated.txt` gives two groups) and the default id prefix.
pub fn load_file(path: &Path) -> Result<Vec<Prompt>, PromptError> {
    let name = crate::paths::recorded(path.as_os_str());
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext != "txt" && ext != "jsonl" {
        return Err(PromptError::UnknownType(name));
    }
    let text = read_bounded(path).map_err(|e| PromptError::Read(name.clone(), e))?;
    let mut out = Vec::new();
    match ext.as_str() {
        "txt" => {
            for (i, line) in text.lines().enumerate() {
                let t = line.trim();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                out.push(Prompt {
                    id: format!("{stem}:{}", i + 1),
                    label: Some(stem.clone()),
                    text: t.to_string(),
                    source: format!("{name}:{}", i + 1),
                    target: None,
                    foil: None,
                });
            }
        }
        "jsonl" => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let src = format!("{name}:{}", i + 1);
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| PromptError::Json(src.clone(), e.to_string()))?;
                let obj = v
                    .as_object()
                    .ok_or_else(|| PromptError::Json(src.clone(), "expected an object".into()))?;
                let text = obj
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| PromptError::NoText(src.clone()))?;
                if text.trim().is_empty() {
                    return Err(PromptError::Empty(src));
                }
                let field = |k: &'static str| -> Result<Option<String>, PromptError> {
                    match obj.get(k) {
                        None | Some(serde_json::Value::Null) => Ok(None),
                        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                        Some(serde_json::Value::Number(n)) if k == "id" => Ok(Some(n.to_string())),
                        Some(_) => Err(PromptError::FieldType(src.clone(), k)),
                    }
                };
                out.push(Prompt {
                    id: field("id")?.unwrap_or_else(|| format!("{stem}:{}", i + 1)),
                    label: field("label")?.or_else(|| Some(stem.clone())),
                    text: text.to_string(),
                    target: field("target")?,
                    foil: field("foil")?,
                    source: src,
                });
            }
        }
        _ => return Err(PromptError::UnknownType(name)),
    }
    if out.is_empty() {
        return Err(PromptError::NoPromptsInFile(name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn txt_skips_blank_and_comments_and_labels_by_stem() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "para.txt", "# c\n\nfirst\n  second  \n");
        let v = load_file(&p).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].text, "first");
        assert_eq!(v[1].text, "second");
        assert_eq!(v[1].id, "para:4");
        assert_eq!(v[0].label.as_deref(), Some("para"));
    }

    #[test]
    fn jsonl_fields_and_errors_name_the_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "x.jsonl",
            "{\"text\":\"a\",\"label\":\"L\",\"id\":\"one\"}\n{\"text\":\"b\"}\n",
        );
        let v = load_file(&p).unwrap();
        assert_eq!(v[0].id, "one");
        assert_eq!(v[0].label.as_deref(), Some("L"));
        assert_eq!(v[1].label.as_deref(), Some("x"));
        let bad = write(d.path(), "bad.jsonl", "{\"text\":\"a\"}\n{oops\n");
        let e = load_file(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:2"), "{e}");
        let no_text = write(d.path(), "nt.jsonl", "{\"label\":\"a\"}\n");
        assert!(load_file(&no_text)
            .unwrap_err()
            .to_string()
            .contains("nt.jsonl:1"));
    }

    #[test]
    fn duplicate_ids_and_empty_prompts_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "x.jsonl",
            "{\"text\":\"a\",\"id\":\"same\"}\n{\"text\":\"b\",\"id\":\"same\"}\n",
        );
        let e = collect(&[], &[p]).unwrap_err().to_string();
        assert!(e.contains("duplicate prompt id \"same\""), "{e}");
        assert!(matches!(
            collect(&["  ".into()], &Vec::<std::path::PathBuf>::new()),
            Err(PromptError::Empty(_))
        ));
        assert!(matches!(
            collect(&[], &Vec::<std::path::PathBuf>::new()),
            Err(PromptError::None)
        ));
    }
}
