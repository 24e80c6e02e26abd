//! Plain decoding without capture: the baseline for benchmarks and the reference for tests
//! (greedy generation must give the same text with and without tracing).

use crate::llama::context::{Batch, Context, ContextError, ContextParams};
use crate::llama::model::Model;
use crate::llama::Token;

use super::engine::argmax;

/// A context without the eval callback, for `n_seq` sequences of up to `ctx` tokens each.
pub fn context(
    model: &Model,
    ctx: usize,
    n_seq: usize,
    n_batch: usize,
    threads: i32,
) -> Result<Context<'_>, ContextError> {
    // A decode never holds more tokens than the KV cache (as llama.cpp would lower it).
    let n_ctx = ctx.saturating_mul(n_seq);
    let n_batch = n_batch.min(n_ctx);
    Context::new(
        model,
        ContextParams {
            n_ctx,
            n_batch,
            n_ubatch: n_batch.min(512),
            n_seq_max: n_seq,
            n_outputs_max: 0,
            n_threads: threads,
            embeddings: false,
            capture: None,
            cache_type: Default::default(),
            no_flash_attn: false,
        },
    )
}

/// Greedy continuation of one prompt: up to `n` tokens, stopping at an end-of-generation token.
pub fn greedy(
    ctx: &mut Context<'_>,
    prompt: &[Token],
    n: usize,
) -> Result<Vec<Token>, ContextError> {
    ctx.clear_memory();
    let mut batch = Batch::new(prompt.len().max(1))?;
    for (i, &t) in prompt.iter().enumerate() {
        batch.push(t, i, 0, i + 1 == prompt.len());
    }
    ctx.decode(&batch)?;
    let mut out = Vec::new();
    let mut last = prompt.len() - 1;
    loop {
        let logits = ctx.logits_ith(last).expect("the last token is an output");
        let t = argmax(logits) as Token;
        if out.len() == n || ctx.model().is_eog(t) {
            break;
        }
        out.push(t);
        if out.len() == n {
            break;
        }
        batch.clear();
        batch.push(t, prompt.len() + out.len() - 1, 0, true);
        ctx.decode(&batch)?;
        last = 0;
    }
    Ok(out)
}

/// Decode prompts one batch of sequences at a time, as a plain (untraced) baseline. `output_all`
/// marks every token as an output (as `--positions all` tracing must); otherwise only the last
/// token of each prompt.
pub fn decode_prompts(
    ctx: &mut Context<'_>,
    prompts: &[Vec<Token>],
    n_seq: usize,
    n_batch: usize,
    output_all: bool,
) -> Result<(), ContextError> {
    let mut batch = Batch::new(n_batch)?;
    for group in prompts.chunks(n_seq) {
        ctx.clear_memory();
        let work: Vec<(usize, usize)> = group
            .iter()
            .enumerate()
            .flat_map(|(s, p)| (0..p.len()).map(move |i| (s, i)))
            .collect();
        for chunk in work.chunks(n_batch) {
            batch.clear();
            for &(s, i) in chunk {
                batch.push(group[s][i], i, s, output_all || i + 1 == group[s].len());
            }
            ctx.decode(&batch)?;
        }
    }
    Ok(())
}
