//! `gguf-trace inspect MODEL [--json]`.

use std::io::Write;

use anyhow::{Context as _, Result};

use super::{human_bytes, load_model};
use crate::capture::arch;
use crate::cli::InspectArgs;
use crate::llama::gguf::Gguf;
use crate::llama::model::LoadOptions;
use crate::model_info::{ModelFacts, Trust};

pub fn run(args: &InspectArgs, out: &mut dyn Write) -> Result<()> {
    // Weights are memory-mapped, not read: loading is quick even for large files (the graph
    // check decodes one token, which reads them all). (vocab_only loads leave the per-layer
    // hyper-parameters unset and llama.cpp aborts on n_head.)
    let model = load_model(args.model.path(), LoadOptions::default())?;
    let gguf = Gguf::open(args.model.path())?;
    let mut facts = ModelFacts::gather(args.model.path(), &model, &gguf);
    // The verdict is the trace's own: the same structural check of llama.cpp's graph, verified
    // architectures included (a file can hold a variant whose graph differs, e.g. gemma3n).
    let checked = facts.untraceable.is_none() && !args.no_check;
    if checked {
        match arch::self_check(&model) {
            Ok(()) if facts.trust == Trust::Unchecked => facts.trust = Trust::SelfChecked,
            Ok(()) => {}
            Err(why) => {
                facts.trust = Trust::Untraceable;
                facts.untraceable = Some(why);
            }
        }
    }
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &facts).context("writing JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "file          {}", facts.path)?;
    writeln!(
        out,
        "name          {}",
        facts.name.as_deref().unwrap_or("-")
    )?;
    writeln!(out, "architecture  {}", facts.architecture)?;
    writeln!(out, "file type     {}", facts.file_type)?;
    writeln!(out, "tensor types  {}", facts.tensor_mix())?;
    writeln!(out, "parameters    {:.1} M", facts.n_params as f64 / 1e6)?;
    writeln!(
        out,
        "size          {} (file {})",
        human_bytes(facts.size_bytes),
        human_bytes(facts.file_bytes)
    )?;
    writeln!(
        out,
        "layers        {} (points 0..={})",
        facts.n_layer, facts.n_layer
    )?;
    writeln!(out, "width         {}", facts.n_embd)?;
    writeln!(
        out,
        "heads         {} (kv {})",
        facts.n_head, facts.n_head_kv
    )?;
    writeln!(out, "vocab         {}", facts.n_vocab)?;
    writeln!(out, "context       {} (trained)", facts.n_ctx_train)?;
    writeln!(
        out,
        "chat template {}",
        if facts.has_chat_template { "yes" } else { "no" }
    )?;
    match &facts.untraceable {
        None if checked => writeln!(
            out,
            "traceable     yes: llama.cpp's graph checked (point 0 = `{}`, points 1.. = `l_out-*`)",
            facts.point0_tensor
        )?,
        None => writeln!(
            out,
            "traceable     not checked (--no-check): a trace checks llama.cpp's graph on its first decode"
        )?,
        Some(why) => writeln!(out, "traceable     no: {why}")?,
    }
    if facts.untraceable.is_none() {
        writeln!(out, "trust         {}", facts.trust.describe())?;
        // The check proves the graph's structure; these it cannot see.
        for a in &facts.assumptions {
            writeln!(out, "assumes       {a}")?;
        }
    }
    Ok(())
}
