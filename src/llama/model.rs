//! A loaded model: metadata, vocabulary and tokenizer.

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::{backend, c_str_to_string, Token};

/// Errors at the model boundary.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: llama.cpp could not load the model{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Load {
        path: String,
        reason: Option<String>,
    },
    #[error("path contains a NUL byte: {0}")]
    NulInPath(String),
    #[error("tokenization failed for a text of {0} bytes")]
    Tokenize(usize),
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Layers to offload to a GPU (0 = CPU only; a large number = all).
    pub n_gpu_layers: i32,
    /// Load only the vocabulary and hyper-parameters, no weights (for `inspect`).
    pub vocab_only: bool,
    /// Memory-map the weights (llama.cpp's default). Mapped weights are read lazily from the file:
    /// if the file is truncated or replaced while a trace runs, the process gets SIGBUS, which no
    /// user-space check can turn into an error. `false` reads the weights into memory up front.
    pub use_mmap: bool,
    /// Share of the offloaded layers per device (llama.cpp's `--tensor-split`); empty: even.
    pub tensor_split: Vec<f32>,
    /// Let the CPU backend repack quantized weights into its interleaved layouts (llama.cpp's
    /// default, "extra buffer types"): other kernels, so slightly different numbers than the same
    /// model on an RPC worker or a GPU, which use the file's layout.
    pub cpu_repack: bool,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            n_gpu_layers: 0,
            vocab_only: false,
            use_mmap: true,
            tensor_split: Vec::new(),
            cpu_repack: true,
        }
    }
}

/// An owned `llama_model`. Freed on drop; contexts borrow it.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
}

// SAFETY: a llama_model is immutable after loading and llama.cpp allows using it from several
// threads (contexts carry the mutable state); we never mutate it through &Model.
unsafe impl Send for Model {}
// SAFETY: every method taking &self only reads the model (llama.cpp's getters and
// llama_model_get_vocab), which llama.cpp allows from several threads at once.
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: ptr came from llama_model_load_from_file and is freed exactly once; contexts
        // borrowing the model have been dropped (lifetimes enforce it).
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// llama.cpp's load progress: marks progress for the RPC watchdog and lets the load go on.
unsafe extern "C" fn load_progress(_progress: f32, _user: *mut std::ffi::c_void) -> bool {
    super::rpc::progress();
    true
}

impl Model {
    /// Load a GGUF model. The caller should have validated that the path is a readable GGUF file
    /// for a friendlier error; llama.cpp's own reason (from its log) is attached on failure.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model, ModelError> {
        backend::init();
        let cpath =
            super::c_path(path).ok_or_else(|| ModelError::NulInPath(path.display().to_string()))?;
        // SAFETY: returns a plain struct of defaults.
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = opts.n_gpu_layers;
        params.vocab_only = opts.vocab_only;
        params.use_extra_bufts = opts.cpu_repack && backend::cpu_repack_usable();
        if !opts.use_mmap {
            params.load_mode = sys::LLAMA_LOAD_MODE_NONE;
        }
        // llama.cpp reads llama_max_devices() floats from tensor_split.
        // SAFETY: pure getter.
        let max_devices = unsafe { sys::llama_max_devices() };
        let mut split = vec![0f32; max_devices];
        if !opts.tensor_split.is_empty() {
            if opts.tensor_split.len() > max_devices {
                return Err(ModelError::Load {
                    path: path.display().to_string(),
                    reason: Some(format!(
                        "--tensor-split names more than {max_devices} devices"
                    )),
                });
            }
            split[..opts.tensor_split.len()].copy_from_slice(&opts.tensor_split);
            params.tensor_split = split.as_ptr();
        }
        backend::clear_log();
        // Loading uploads the weights to RPC workers: the watchdog counts llama.cpp's progress.
        params.progress_callback = Some(load_progress);
        params.progress_callback_user_data = std::ptr::null_mut();
        let ptr = {
            let _watch = super::rpc::arm();
            // SAFETY: cpath is a valid NUL-terminated string for the duration of the call; params
            // is a fully initialised struct whose pointers are the defaults (null or static),
            // `split` (llama_max_devices() floats, outliving the call) or load_progress (a
            // function that never unwinds and ignores its null user data).
            unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), params) }
        };
        match NonNull::new(ptr) {
            Some(ptr) => Ok(Model { ptr }),
            None => Err(ModelError::Load {
                path: path.display().to_string(),
                reason: backend::last_error_line(),
            }),
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_model {
        self.ptr.as_ptr()
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model pointer is valid; the vocab lives as long as the model.
        unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) }
    }

    /// Number of transformer blocks.
    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) }.max(0) as usize
    }

    /// Width of the residual stream.
    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) }.max(0) as usize
    }

    pub fn n_head(&self) -> usize {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_n_head(self.ptr.as_ptr()) }.max(0) as usize
    }

    /// Sliding-window size of the attention layers that have one (0: none).
    pub fn n_swa(&self) -> usize {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_n_swa(self.ptr.as_ptr()) }.max(0) as usize
    }

    pub fn n_head_kv(&self) -> usize {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_n_head_kv(self.ptr.as_ptr()) }.max(0) as usize
    }

    pub fn n_ctx_train(&self) -> usize {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()) }.max(0) as usize
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer; pure getter.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }.max(0) as usize
    }

    pub fn n_params(&self) -> u64 {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_n_params(self.ptr.as_ptr()) }
    }

    pub fn size_bytes(&self) -> u64 {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_size(self.ptr.as_ptr()) }
    }

    /// llama.cpp's one-line description ("llama 135M Q4_1").
    pub fn desc(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is writable for buf.len() bytes; llama.cpp NUL-terminates within that size.
        let n =
            unsafe { sys::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The file type label ("Q4_1", "Q4_K - Medium", ...).
    pub fn ftype_name(&self) -> String {
        // SAFETY: valid model pointer; llama_ftype_name returns a static string for any value.
        unsafe {
            c_str_to_string(sys::llama_ftype_name(sys::llama_model_ftype(
                self.ptr.as_ptr(),
            )))
        }
    }

    /// A metadata value as a string, if the key exists.
    pub fn meta(&self, key: &str) -> Option<String> {
        let ckey = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: ckey is NUL-terminated; buf is writable for buf.len() bytes.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.ptr.as_ptr(),
                    ckey.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    pub fn is_recurrent(&self) -> bool {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_is_recurrent(self.ptr.as_ptr()) }
    }

    pub fn is_hybrid(&self) -> bool {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_is_hybrid(self.ptr.as_ptr()) }
    }

    pub fn has_encoder(&self) -> bool {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_has_encoder(self.ptr.as_ptr()) }
    }

    pub fn has_decoder(&self) -> bool {
        // SAFETY: valid model pointer; pure getter.
        unsafe { sys::llama_model_has_decoder(self.ptr.as_ptr()) }
    }

    /// Whether the tokenizer adds BOS / EOS to a raw text (from the GGUF metadata).
    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab pointer; pure getter.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    pub fn add_eos(&self) -> bool {
        // SAFETY: valid vocab pointer; pure getter.
        unsafe { sys::llama_vocab_get_add_eos(self.vocab()) }
    }

    pub fn bos(&self) -> Token {
        // SAFETY: valid vocab pointer; pure getter.
        unsafe { sys::llama_vocab_bos(self.vocab()) }
    }

    pub fn eos(&self) -> Token {
        // SAFETY: valid vocab pointer; pure getter.
        unsafe { sys::llama_vocab_eos(self.vocab()) }
    }

    /// Whether a token ends generation (EOS, EOT, ...).
    pub fn is_eog(&self, t: Token) -> bool {
        // SAFETY: valid vocab pointer; any token id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), t) }
    }

    /// Tokenize `text`. `add_special` adds BOS/EOS as the model's metadata says; `parse_special`
    /// turns special-token text such as `<|im_start|>` into the special token (as llama.cpp's CLI).
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>, ModelError> {
        let len = i32::try_from(text.len()).map_err(|_| ModelError::Tokenize(text.len()))?;
        let mut out: Vec<Token> = vec![0; text.len() + 8];
        for _ in 0..2 {
            // SAFETY: text points to len valid bytes (no NUL needed, length given); out is writable
            // for out.len() tokens.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr().cast(),
                    len,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_special,
                    parse_special,
                )
            };
            if n == i32::MIN {
                return Err(ModelError::Tokenize(text.len()));
            }
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            out.resize((-n) as usize, 0);
        }
        Err(ModelError::Tokenize(text.len()))
    }

    /// The raw bytes a token stands for (special tokens rendered as their text when `special`).
    pub fn token_bytes(&self, t: Token, special: bool) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf is writable for buf.len() bytes; llama.cpp writes at most that many.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    t,
                    buf.as_mut_ptr().cast(),
                    buf.len() as i32,
                    0,
                    special,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    /// A token's text piece (special tokens shown), lossy UTF-8 (a piece may be part of a character).
    pub fn token_piece(&self, t: Token) -> String {
        String::from_utf8_lossy(&self.token_bytes(t, true)).into_owned()
    }

    /// Text of a sequence of tokens, joining bytes first so multi-byte characters survive.
    pub fn detokenize(&self, tokens: &[Token], special: bool) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| self.token_bytes(t, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
