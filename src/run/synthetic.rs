//! Synthetic run directories for benchmarks and scale tests of the report: random-walk
//! trajectories (no model involved), written through the real [`RunWriter`] so they are valid runs.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::Array3;

use super::{
    CaptureSettings, Dtype, Format, Manifest, PromptRecord, Provenance, RunError, RunShape,
    RunWriter, Timings, SCHEMA_VERSION,
};
use crate::capture::engine::{Positions, PromptTrace};
use crate::model_info::ModelFacts;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Write a synthetic run of `n_prompts` prompts (labels alternate between `labels`), `n_layer`
/// blocks and width `n_embd`, one position per prompt, states in f32.
pub fn write(
    dir: &Path,
    n_prompts: usize,
    n_layer: usize,
    n_embd: usize,
    labels: &[&str],
    seed: u64,
) -> Result<(), RunError> {
    write_with(dir, n_prompts, n_layer, n_embd, labels, seed, Dtype::F32)
}

/// [`write`] with the states files in `dtype` (`last.npy` is f32 in every run).
pub fn write_with(
    dir: &Path,
    n_prompts: usize,
    n_layer: usize,
    n_embd: usize,
    labels: &[&str],
    seed: u64,
    dtype: Dtype,
) -> Result<(), RunError> {
    let n_points = n_layer + 1;
    let n_vocab = 16;
    let shape = RunShape {
        n_prompts,
        n_points,
        n_embd,
        n_vocab,
        taps: Vec::new(),
    };
    let mut w = RunWriter::create(dir, true, shape, dtype, Format::Npy)?;
    let mut s = seed;
    // A shared drift direction per label makes groups converge, like paraphrases do.
    let drift: Vec<Vec<f32>> = labels
        .iter()
        .map(|_| (0..n_embd).map(|_| lcg(&mut s)).collect())
        .collect();
    let points: Vec<usize> = (0..n_points).collect();
    let mut prompts = Vec::with_capacity(n_prompts);
    for i in 0..n_prompts {
        let g = i % labels.len().max(1);
        let mut states = Array3::<f32>::zeros((n_points, 1, n_embd));
        let mut h: Vec<f32> = (0..n_embd).map(|_| lcg(&mut s)).collect();
        for p in 0..n_points {
            for (d, x) in h.iter_mut().enumerate() {
                *x += 0.3 * lcg(&mut s) + 0.05 * p as f32 * drift[g][d];
            }
            states
                .slice_mut(ndarray::s![p, 0, ..])
                .assign(&ndarray::ArrayView1::from(&h[..]));
        }
        let t = PromptTrace {
            index: i,
            states,
            taps: Vec::new(),
            positions: vec![0],
            tokens: vec![1],
            n_prompt: 1,
            logits: vec![0.0; n_vocab],
            nonfinite: None,
        };
        let id = format!("s{i}");
        let label = labels.get(g).copied();
        let (states_file, tap_files) =
            w.write_prompt(&t, &points, &id, label, &["x".to_string()])?;
        prompts.push(PromptRecord {
            index: i,
            id,
            label: label.map(str::to_string),
            source: "synthetic".into(),
            text: format!("synthetic prompt {i}"),
            rendered: format!("synthetic prompt {i}"),
            tokens: vec![1],
            nonfinite: None,
            attribution: None,
            pieces: vec!["x".into()],
            n_prompt_tokens: 1,
            positions: vec![0],
            generated_text: String::new(),
            top: Vec::new(),
            states_file,
            tap_files,
        });
    }
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        complete: false,
        tool: env!("CARGO_PKG_NAME").into(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        created: chrono::Utc::now().to_rfc3339(),
        provenance: Provenance {
            model_sha256: String::new(),
            llama_cpp_sys_2: String::new(),
            system_info: "synthetic".into(),
            devices: vec![],
            command_line: vec![],
        },
        model: ModelFacts {
            path: "synthetic".into(),
            file_name: "synthetic.gguf".into(),
            architecture: "synthetic".into(),
            name: None,
            file_type: "F32".into(),
            tensor_types: BTreeMap::new(),
            n_layer,
            n_embd,
            n_head: 1,
            n_head_kv: 1,
            n_vocab,
            n_ctx_train: 0,
            n_params: 0,
            size_bytes: 0,
            file_bytes: 0,
            has_chat_template: false,
            point0_tensor: String::new(),
            untraceable: None,
            trust: Default::default(),
            assumptions: Vec::new(),
        },
        capture: CaptureSettings {
            cache_type: Default::default(),
            ablation: None,
            patch: None,
            ablated_heads: None,
            taps: Vec::new(),
            settings: None,
            flash_attn_off: false,
            points: points.clone(),
            point_tensors: points
                .iter()
                .map(|&p| crate::capture::arch::point_tensor("synthetic", p))
                .collect(),
            positions: Positions::Last,
            generate: 0,
            chat: false,
            system: None,
            dtype,
            format: Format::Npy,
            ctx: 1,
            n_seq: 1,
            n_batch: 1,
            n_ubatch: 1,
            threads: 1,
            n_gpu_layers: 0,
            control_vectors: vec![],
            control_scale: 0.0,
            control_points: None,
            allow_nonfinite: false,
            rpc: vec![],
            tensor_split: vec![],
            cpu_repack: true,
        },
        prompts,
        timings: Timings::default(),
        plan: None,
        lens: None,
        attribution: None,
    };
    w.finish(&manifest)?;
    Ok(())
}
