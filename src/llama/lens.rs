//! The logit-lens head: the model's final norm and unembedding applied to any residual state,
//! computed with a small ggml graph on the CPU backend over the *quantized* output matrix read
//! from the GGUF (llama.h exposes no model tensors), so the lens uses the same kernels as the
//! model's own output layer instead of a hand-dequantized copy.

use std::ffi::c_void;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::gguf::{Gguf, TensorInfo};

#[derive(Debug, thiserror::Error)]
pub enum LensError {
    #[error("{0}: the logit lens needs {1}, which the file does not hold")]
    Missing(String, String),
    #[error("{path}: reading {name}: {source}")]
    Io {
        path: String,
        name: String,
        source: std::io::Error,
    },
    #[error("{0}: tensor {1} has an unexpected shape or type ({2}); the logit lens cannot use it")]
    Shape(String, String, String),
    #[error("ggml could not allocate {0} bytes for the lens")]
    Alloc(usize),
    #[error("the lens graph failed to compute (ggml status {0})")]
    Compute(i32),
}

/// Normalisation before the unembedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    Rms,
    /// LayerNorm (mean removed), with `output_norm.bias` added when the file has one.
    Layer,
}

/// The final norm + unembedding (+ optional logit soft-capping) of one model.
pub struct LensHead {
    /// Owns the head's tensors below (held only to be freed when the head is dropped).
    _ctx: GgmlCtx,
    w_out: *mut sys::ggml_tensor,
    w_norm: Option<*mut sys::ggml_tensor>,
    b_norm: Option<*mut sys::ggml_tensor>,
    /// `output.bias`, added after the unembedding (phi2, phi3, some qwen2).
    b_out: Option<*mut sys::ggml_tensor>,
    pub norm: Norm,
    pub eps: f32,
    pub softcap: f32,
    /// Factor applied to the logits (`{arch}.logit_scale`: multiplied by command-r / cohere,
    /// divided by by granite); 1 when the file has none.
    pub logit_scale: f32,
    n_embd: usize,
    n_vocab: usize,
    /// Name of the unembedding tensor used (`output.weight`, or `token_embd.weight` when tied).
    pub output_tensor: String,
    threads: i32,
}

/// A ggml context that owns `mem` bytes for its tensors, freed when dropped (on every return
/// path); tensors created in it must not be used after that.
struct GgmlCtx(NonNull<sys::ggml_context>);

impl GgmlCtx {
    fn new(mem: usize) -> Result<GgmlCtx, LensError> {
        // SAFETY: allocates a context owning `mem` bytes; null on failure (checked).
        let ctx = unsafe {
            sys::ggml_init(sys::ggml_init_params {
                mem_size: mem,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: false,
            })
        };
        NonNull::new(ctx).map(GgmlCtx).ok_or(LensError::Alloc(mem))
    }

    fn as_ptr(&self) -> *mut sys::ggml_context {
        self.0.as_ptr()
    }
}

impl Drop for GgmlCtx {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ggml_init and is freed once, here; its owner (a LensHead
        // or a scratch context of one call) uses none of its tensors after dropping it.
        unsafe { sys::ggml_free(self.0.as_ptr()) }
    }
}

/// A tensor of `ctx` (1-D or 2-D, as `t`'s shape) holding the bytes of `t` read from the file.
///
/// # Safety
/// `ctx` has room for the tensor (`t.size` bytes plus a tensor's overhead) and `t.ty_id` is a ggml
/// type (`< GGML_TYPE_COUNT`).
unsafe fn tensor_from_file(
    ctx: &GgmlCtx,
    path: &Path,
    t: &TensorInfo,
) -> Result<*mut sys::ggml_tensor, LensError> {
    // SAFETY: room and type as the caller guarantees.
    let g = unsafe {
        match t.shape.as_slice() {
            [n] => sys::ggml_new_tensor_1d(ctx.as_ptr(), t.ty_id, *n as i64),
            [n0, n1] => sys::ggml_new_tensor_2d(ctx.as_ptr(), t.ty_id, *n0 as i64, *n1 as i64),
            _ => std::ptr::null_mut(),
        }
    };
    if g.is_null() {
        return Err(LensError::Shape(
            path.display().to_string(),
            t.name.clone(),
            format!("{} {:?}", t.ty, t.shape),
        ));
    }
    // SAFETY: g is a live tensor of ctx.
    let (data, nbytes) = unsafe { (sys::ggml_get_data(g), sys::ggml_nbytes(g)) };
    if nbytes != t.size {
        return Err(LensError::Io {
            path: path.display().to_string(),
            name: t.name.clone(),
            source: std::io::Error::other(format!(
                "size {} in the file, {} expected",
                t.size, nbytes
            )),
        });
    }
    // SAFETY: data is this fresh tensor's buffer of nbytes bytes, referenced by nothing else.
    unsafe { read_into(path, t, data, nbytes)? };
    Ok(g)
}

/// Compute `out` (an F32 tensor of `ctx` holding `n` contiguous values) and copy it out.
///
/// # Safety
/// `out` and every tensor it is computed from are live (in `ctx` or another live context) with
/// host data, and `out` holds `n` contiguous f32 once computed.
unsafe fn compute_f32(
    ctx: &GgmlCtx,
    out: *mut sys::ggml_tensor,
    n: usize,
    threads: i32,
) -> Result<Vec<f32>, LensError> {
    // SAFETY: as the caller guarantees; the graph is allocated in ctx.
    unsafe {
        let gf = sys::ggml_new_graph(ctx.as_ptr());
        sys::ggml_build_forward_expand(gf, out);
        let status = sys::ggml_graph_compute_with_ctx(ctx.as_ptr(), gf, threads);
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(LensError::Compute(status));
        }
        let mut v = vec![0f32; n];
        std::ptr::copy_nonoverlapping(sys::ggml_get_data(out).cast::<f32>(), v.as_mut_ptr(), n);
        Ok(v)
    }
}

/// Read tensor `t`'s bytes from the file into `dst`.
///
/// # Safety
/// `dst` points to `len` writable bytes that nothing else references during the call.
unsafe fn read_into(
    path: &Path,
    t: &TensorInfo,
    dst: *mut c_void,
    len: usize,
) -> Result<(), LensError> {
    let io = |source| LensError::Io {
        path: path.display().to_string(),
        name: t.name.clone(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    f.seek(SeekFrom::Start(t.offset)).map_err(io)?;
    // SAFETY: the caller guarantees dst is `len` writable, unaliased bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
    f.read_exact(buf).map_err(io)
}

/// Rows `ids` of the 2-D tensor `w` (`width` values per row, any ggml type) as float32,
/// `[ids.len(), width]` row-major: ggml's own `get_rows`, which dequantizes.
///
/// # Safety
/// `w` is a live 2-D tensor with `width` elements per row whose data is in host memory, and every
/// id is a row of it.
unsafe fn rows_f32(
    w: *mut sys::ggml_tensor,
    width: usize,
    ids: &[i32],
    threads: i32,
) -> Result<Vec<f32>, LensError> {
    let n = ids.len();
    // SAFETY: pure size queries.
    let mem = n * width * 4
        + n * 4
        + unsafe { sys::ggml_graph_overhead() + 8 * sys::ggml_tensor_overhead() }
        + (1 << 20);
    let ctx = GgmlCtx::new(mem)?;
    // SAFETY: `idx` is an I32 tensor of n elements created in ctx and filled from `ids` (rows of
    // w, per the caller); w is live with host data (the caller); get_rows yields an F32
    // [width, n] tensor in ctx, copied out while ctx lives.
    unsafe {
        let idx = sys::ggml_new_tensor_1d(ctx.as_ptr(), sys::GGML_TYPE_I32, n as i64);
        std::ptr::copy_nonoverlapping(ids.as_ptr(), sys::ggml_get_data(idx).cast::<i32>(), n);
        let rows = sys::ggml_get_rows(ctx.as_ptr(), w, idx);
        compute_f32(&ctx, rows, n * width, threads)
    }
}

/// The whole 2-D tensor `t` of the GGUF at `path` as float32 (`[ne1, ne0]` row-major: row k holds
/// the `ne0` values of index k), dequantized by ggml's `get_rows` from the file's own bytes.
pub fn dequantized(path: &Path, t: &TensorInfo, threads: i32) -> Result<Vec<f32>, LensError> {
    let p = path.display().to_string();
    let (ne0, ne1) = match t.shape.as_slice() {
        [a, b] if *a > 0 && *b > 0 && t.ty_id < sys::GGML_TYPE_COUNT => (*a, *b),
        _ => {
            return Err(LensError::Shape(
                p,
                t.name.clone(),
                format!("{} {:?}", t.ty, t.shape),
            ))
        }
    };
    // SAFETY: pure size query.
    let ctx = GgmlCtx::new(t.size + 2 * unsafe { sys::ggml_tensor_overhead() } + 1024)?;
    // SAFETY: the context has room for the tensor and its type was checked above; the tensor is
    // read from the file before get_rows reads it; ids 0..ne1 are its rows.
    unsafe {
        let g = tensor_from_file(&ctx, path, t)?;
        let ids: Vec<i32> = (0..ne1 as i32).collect();
        rows_f32(g, ne0, &ids, threads)
    }
}

impl LensHead {
    /// Load the final norm and the unembedding of the model at `path`.
    pub fn load(path: &Path, gguf: &Gguf, threads: i32) -> Result<LensHead, LensError> {
        super::backend::init();
        let p = path.display().to_string();
        let arch = gguf.get_str("general.architecture").unwrap_or_default();
        let tensors = gguf.tensors();
        let find = |n: &str| tensors.iter().find(|t| t.name == n).cloned();
        let w_out_info = find("output.weight")
            .or_else(|| find("token_embd.weight"))
            .ok_or_else(|| {
                LensError::Missing(p.clone(), "output.weight or token_embd.weight".into())
            })?;
        // Without `output_norm.weight` the final norm has no scale (olmo's is non-parametric).
        let w_norm_info = find("output_norm.weight");
        let b_norm_info = find("output_norm.bias");
        let b_out_info = find("output.bias");
        // llama.cpp reads the RMSNorm epsilon for architectures that use RMSNorm and the LayerNorm
        // epsilon for those that use LayerNorm (cohere2moe: LayerNorm when the RMS one is 0); the
        // kind does not follow from a bias (phimoe has RMSNorm with a bias, command-r LayerNorm
        // without one). Files with both keys (nemotron) or neither: LayerNorm when there is a bias.
        let rms_eps = gguf
            .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .filter(|&e| e != 0.0);
        let layer_eps = gguf.get_f64(&format!("{arch}.attention.layer_norm_epsilon"));
        let bias = b_norm_info.is_some();
        let (norm, eps) = match (rms_eps, layer_eps) {
            (Some(e), None) => (Norm::Rms, e),
            (None, Some(e)) => (Norm::Layer, e),
            (Some(_), Some(e)) if bias => (Norm::Layer, e),
            (Some(e), Some(_)) => (Norm::Rms, e),
            (None, None) if bias => (Norm::Layer, 1e-5),
            (None, None) => (Norm::Rms, 1e-5),
        };
        let eps = eps as f32;
        let softcap = gguf
            .get_f64(&format!("{arch}.final_logit_softcapping"))
            .unwrap_or(0.0) as f32;
        let logit_scale = match gguf.get_f64(&format!("{arch}.logit_scale")) {
            Some(s) if s != 0.0 && arch.starts_with("granite") => (1.0 / s) as f32,
            Some(s) if s != 0.0 => s as f32,
            _ => 1.0,
        };
        let (n_embd, n_vocab) = (
            w_out_info.shape[0],
            w_out_info.shape.get(1).copied().unwrap_or(1),
        );
        // A hostile or unusual file must not reach ggml's assertions: check shapes and types.
        let shape_ok = |t: &TensorInfo, want: &[usize], float: bool| {
            t.shape.as_slice() == want
                && t.ty_id < sys::GGML_TYPE_COUNT
                && (!float || t.ty_id == sys::GGML_TYPE_F32)
        };
        for (t, want, float) in [
            (Some(&w_out_info), vec![n_embd, n_vocab], false),
            (w_norm_info.as_ref(), vec![n_embd], true),
            (b_norm_info.as_ref(), vec![n_embd], true),
            (b_out_info.as_ref(), vec![n_vocab], true),
        ] {
            if let Some(t) = t {
                if n_embd == 0 || n_vocab == 0 || !shape_ok(t, &want, float) {
                    return Err(LensError::Shape(
                        p.clone(),
                        t.name.clone(),
                        format!("{} {:?}", t.ty, t.shape),
                    ));
                }
            }
        }
        let mut bytes = w_out_info.size
            + w_norm_info.as_ref().map(|b| b.size).unwrap_or(0)
            + b_norm_info.as_ref().map(|b| b.size).unwrap_or(0)
            + b_out_info.as_ref().map(|b| b.size).unwrap_or(0);
        // SAFETY: pure size query.
        bytes += 6 * unsafe { sys::ggml_tensor_overhead() } + 1024;
        let ctx = GgmlCtx::new(bytes)?;
        // SAFETY: the context has room for these tensors (sized above from the GGUF sizes); their
        // shapes and types were checked above.
        let load = |t: &TensorInfo| unsafe { tensor_from_file(&ctx, path, t) };
        let w_out = load(&w_out_info)?;
        let w_norm = w_norm_info.as_ref().map(load).transpose()?;
        let b_norm = b_norm_info.as_ref().map(load).transpose()?;
        let b_out = b_out_info.as_ref().map(load).transpose()?;
        Ok(LensHead {
            _ctx: ctx,
            w_out,
            w_norm,
            b_norm,
            b_out,
            norm,
            eps,
            softcap,
            logit_scale,
            n_embd,
            n_vocab,
            output_tensor: w_out_info.name.clone(),
            threads,
        })
    }

    /// Width of the states the head reads.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Number of logits per state.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// The float32 values of one of this head's F32 vectors (`None` when the file has none).
    fn vector(&self, t: Option<*mut sys::ggml_tensor>) -> Option<Vec<f32>> {
        t.map(|t| {
            // SAFETY: t is a live F32 tensor of self.ctx (its type was checked at load); its data
            // holds ggml_nelements(t) contiguous floats.
            unsafe {
                let n = sys::ggml_nelements(t) as usize;
                std::slice::from_raw_parts(sys::ggml_get_data(t).cast::<f32>(), n).to_vec()
            }
        })
    }

    /// What the attribution needs of the readout: the final norm's kind, epsilon, gain and bias,
    /// the logit scale and soft-capping.
    pub fn readout(&self) -> crate::analysis::attribution::Readout {
        crate::analysis::attribution::Readout {
            layer_norm: self.norm == Norm::Layer,
            eps: self.eps,
            gain: self.vector(self.w_norm),
            bias: self.vector(self.b_norm),
            logit_scale: self.logit_scale,
            softcap: self.softcap,
        }
    }

    /// The output bias of each token in `ids` (0 without `output.bias`).
    pub fn output_bias(&self, ids: &[i32]) -> Vec<f32> {
        match self.vector(self.b_out) {
            Some(b) => ids.iter().map(|&i| b[i as usize]).collect(),
            None => vec![0.0; ids.len()],
        }
    }

    /// The unembedding rows of `ids` (`[ids.len(), n_embd]`, row-major), dequantized by ggml's
    /// own `get_rows` from the file's tensor (no hand-written dequantization).
    ///
    /// # Panics
    /// When an id is outside the vocabulary.
    pub fn unembedding_rows(&self, ids: &[i32]) -> Result<Vec<f32>, LensError> {
        assert!(ids.iter().all(|&i| i >= 0 && (i as usize) < self.n_vocab));
        // SAFETY: w_out is this head's [n_embd, n_vocab] matrix, alive in self.ctx; the ids are
        // in range (checked above).
        unsafe { rows_f32(self.w_out, self.n_embd, ids, self.threads) }
    }

    /// Logits `[n_rows, n_vocab]` (row-major) of `n_rows` states `x` (`[n_rows, n_embd]`).
    ///
    /// # Panics
    /// When `x.len() != n_rows * n_embd` (the graph would read past `x`).
    pub fn logits(&self, x: &[f32], n_rows: usize) -> Result<Vec<f32>, LensError> {
        assert_eq!(x.len(), n_rows * self.n_embd);
        let out_bytes = n_rows * self.n_vocab * 4;
        // Activations, their quantized copy and the graph, with generous headroom.
        // SAFETY: pure size queries.
        let mem = 3 * out_bytes
            + 8 * n_rows * self.n_embd * 4
            + unsafe { sys::ggml_graph_overhead() + 16 * sys::ggml_tensor_overhead() }
            + (32 << 20);
        // A scratch context for this call, freed when it returns (also on error).
        let ctx = GgmlCtx::new(mem)?;
        // SAFETY: every tensor is created in `ctx` (or is one of this head's weights, alive in
        // self.ctx); shapes agree (x: [n_embd, n_rows], w_out: [n_embd, n_vocab]); the result
        // holds n_vocab*n_rows contiguous f32, copied out while ctx lives.
        unsafe {
            let c = ctx.as_ptr();
            let xt =
                sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, self.n_embd as i64, n_rows as i64);
            std::ptr::copy_nonoverlapping(
                x.as_ptr(),
                sys::ggml_get_data(xt).cast::<f32>(),
                x.len(),
            );
            let mut cur = match self.norm {
                Norm::Rms => sys::ggml_rms_norm(c, xt, self.eps),
                Norm::Layer => sys::ggml_norm(c, xt, self.eps),
            };
            if let Some(w) = self.w_norm {
                cur = sys::ggml_mul(c, cur, w);
            }
            if let Some(b) = self.b_norm {
                cur = sys::ggml_add(c, cur, b);
            }
            let mut out = sys::ggml_mul_mat(c, self.w_out, cur);
            if let Some(b) = self.b_out {
                out = sys::ggml_add(c, out, b);
            }
            if self.logit_scale != 1.0 {
                out = sys::ggml_scale(c, out, self.logit_scale);
            }
            if self.softcap > 0.0 {
                out = sys::ggml_scale(c, out, 1.0 / self.softcap);
                out = sys::ggml_tanh(c, out);
                out = sys::ggml_scale(c, out, self.softcap);
            }
            compute_f32(&ctx, out, n_rows * self.n_vocab, self.threads)
        }
    }
}
