//! Reading GGUF files with ggml's `gguf_*` API: metadata, tensor directory, and raw tensor data.
//!
//! llama.h exposes no model tensors, so weights we need outside llama.cpp (the output norm for
//! checks, later the unembedding for the logit lens) are read here, by offset, from the file.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::{c_str_to_string, ggml_type_name};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{0}: not a readable GGUF file (bad header, truncated or corrupt)")]
    Open(String),
    #[error("{path}: tensor {name} not found")]
    NoTensor { path: String, name: String },
    #[error("{path}: tensor {name} is {ty}, expected f32")]
    NotF32 {
        path: String,
        name: String,
        ty: String,
    },
    #[error("{path}: reading tensor {name}: {source}")]
    Io {
        path: String,
        name: String,
        source: std::io::Error,
    },
}

/// One tensor of the file's directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml type name ("q4_K", "f32", ...).
    pub ty: String,
    pub ty_id: u32,
    pub shape: Vec<usize>,
    /// Byte offset of the data from the start of the file.
    pub offset: u64,
    pub size: usize,
}

/// An open GGUF file's metadata (no tensor data held in memory).
pub struct Gguf {
    ptr: NonNull<sys::gguf_context>,
    path: PathBuf,
}

impl Drop for Gguf {
    fn drop(&mut self) {
        // SAFETY: ptr came from gguf_init_from_file and is freed once.
        unsafe { sys::gguf_free(self.ptr.as_ptr()) }
    }
}

/// A metadata value, converted to JSON-friendly form.
pub type MetaValue = serde_json::Value;

impl Gguf {
    /// Open a GGUF file's header (metadata and tensor directory only).
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        super::backend::init();
        let cpath =
            super::c_path(path).ok_or_else(|| GgufError::Open(path.display().to_string()))?;
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: cpath is NUL-terminated; with no_alloc and a null ctx, gguf reads only the header
        // and returns null on any error.
        let ptr = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
        let ptr = NonNull::new(ptr).ok_or_else(|| GgufError::Open(path.display().to_string()))?;
        Ok(Gguf {
            ptr,
            path: path.to_path_buf(),
        })
    }

    fn key_id(&self, key: &str) -> Option<i64> {
        let ckey = CString::new(key).ok()?;
        // SAFETY: valid context, NUL-terminated key.
        let id = unsafe { sys::gguf_find_key(self.ptr.as_ptr(), ckey.as_ptr()) };
        (id >= 0).then_some(id)
    }

    /// Every metadata key, in file order.
    pub fn keys(&self) -> Vec<String> {
        let c = self.ptr.as_ptr();
        // SAFETY: valid context; ids below gguf_get_n_kv are valid; each key is a NUL-terminated
        // string owned by the context, copied immediately.
        unsafe {
            (0..sys::gguf_get_n_kv(c))
                .map(|i| c_str_to_string(sys::gguf_get_key(c, i)))
                .collect()
        }
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Option<String> {
        let id = self.key_id(key)?;
        // SAFETY: id is a valid key index.
        if unsafe { sys::gguf_get_kv_type(self.ptr.as_ptr(), id) } != sys::GGUF_TYPE_STRING {
            return None;
        }
        // SAFETY: the key holds a string (checked); the NUL-terminated value lives as long as the
        // context and is copied immediately.
        Some(unsafe { c_str_to_string(sys::gguf_get_val_str(self.ptr.as_ptr(), id)) })
    }

    /// A scalar value of any numeric or bool type, as JSON; arrays as their length and type.
    pub fn get(&self, key: &str) -> Option<MetaValue> {
        let id = self.key_id(key)?;
        Some(self.value(id))
    }

    /// A numeric value as f64.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    fn value(&self, id: i64) -> MetaValue {
        use serde_json::json;
        let c = self.ptr.as_ptr();
        // SAFETY: id is a valid key index; each getter is called only for its own type.
        unsafe {
            match sys::gguf_get_kv_type(c, id) {
                sys::GGUF_TYPE_UINT8 => json!(sys::gguf_get_val_u8(c, id)),
                sys::GGUF_TYPE_INT8 => json!(sys::gguf_get_val_i8(c, id)),
                sys::GGUF_TYPE_UINT16 => json!(sys::gguf_get_val_u16(c, id)),
                sys::GGUF_TYPE_INT16 => json!(sys::gguf_get_val_i16(c, id)),
                sys::GGUF_TYPE_UINT32 => json!(sys::gguf_get_val_u32(c, id)),
                sys::GGUF_TYPE_INT32 => json!(sys::gguf_get_val_i32(c, id)),
                sys::GGUF_TYPE_FLOAT32 => json!(sys::gguf_get_val_f32(c, id)),
                sys::GGUF_TYPE_UINT64 => json!(sys::gguf_get_val_u64(c, id)),
                sys::GGUF_TYPE_INT64 => json!(sys::gguf_get_val_i64(c, id)),
                sys::GGUF_TYPE_FLOAT64 => json!(sys::gguf_get_val_f64(c, id)),
                sys::GGUF_TYPE_BOOL => json!(sys::gguf_get_val_bool(c, id)),
                sys::GGUF_TYPE_STRING => json!(c_str_to_string(sys::gguf_get_val_str(c, id))),
                sys::GGUF_TYPE_ARRAY => json!({
                    "array_of": c_str_to_string(sys::gguf_type_name(sys::gguf_get_arr_type(c, id))),
                    "len": sys::gguf_get_arr_n(c, id),
                }),
                other => json!(format!("<gguf type {other}>")),
            }
        }
    }

    /// The tensor directory, in file order.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        let c = self.ptr.as_ptr();
        // SAFETY: valid context; indices below n are valid; returned name pointers live as long as
        // the context and ne points to GGML_MAX_DIMS values.
        unsafe {
            let n = sys::gguf_get_n_tensors(c);
            let base = sys::gguf_get_data_offset(c) as u64;
            (0..n)
                .map(|i| {
                    let ty_id = sys::gguf_get_tensor_type(c, i);
                    let ne = std::slice::from_raw_parts(sys::gguf_get_tensor_ne(c, i), 4);
                    let mut shape: Vec<usize> = ne.iter().map(|&x| x as usize).collect();
                    while shape.len() > 1 && shape.last() == Some(&1) {
                        shape.pop();
                    }
                    TensorInfo {
                        name: c_str_to_string(sys::gguf_get_tensor_name(c, i)),
                        ty: ggml_type_name(ty_id),
                        ty_id,
                        shape,
                        offset: base + sys::gguf_get_tensor_offset(c, i) as u64,
                        size: sys::gguf_get_tensor_size(c, i),
                    }
                })
                .collect()
        }
    }

    /// How many tensors of each ggml type the file holds.
    pub fn type_histogram(&self) -> BTreeMap<String, usize> {
        let mut h = BTreeMap::new();
        for t in self.tensors() {
            *h.entry(t.ty).or_insert(0) += 1;
        }
        h
    }

    /// Read an f32 tensor's values (norm weights and the like).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let path = self.path.display().to_string();
        let t = self
            .tensors()
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::NoTensor {
                path: path.clone(),
                name: name.into(),
            })?;
        if t.ty_id != sys::GGML_TYPE_F32 {
            return Err(GgufError::NotF32 {
                path,
                name: name.into(),
                ty: t.ty,
            });
        }
        let io = |source| GgufError::Io {
            path: path.clone(),
            name: name.into(),
            source,
        };
        let mut f = std::fs::File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(t.offset)).map_err(io)?;
        let mut bytes = vec![0u8; t.size];
        f.read_exact(&mut bytes).map_err(io)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Key of the point where a direction written by `direction` separates its labels best: the
/// default (and calibrated) point to steer at.
pub const PEAK_POINT_KEY: &str = "gguf_trace.peak_point";

/// Write a llama.cpp control-vector GGUF: `general.architecture = controlvector`,
/// `controlvector.model_hint`, `controlvector.layer_count`, and one F32 tensor `direction.<il>`
/// of width n_embd per entry (il ≥ 1: llama.cpp's loader rejects `direction.0`).
pub fn write_control_vector(
    path: &Path,
    model_hint: &str,
    directions: &[(usize, Vec<f32>)],
) -> Result<(), GgufError> {
    write_control_vector_with_peak(path, model_hint, directions, None, None)
}

/// [`write_control_vector`], recording the peak point under [`PEAK_POINT_KEY`] and, when given,
/// a string `(key, value)` (the point selection's JSON); llama.cpp's loader ignores keys it does
/// not know.
pub fn write_control_vector_with_peak(
    path: &Path,
    model_hint: &str,
    directions: &[(usize, Vec<f32>)],
    peak_point: Option<usize>,
    extra: Option<(&str, &str)>,
) -> Result<(), GgufError> {
    super::backend::init();
    let err = || GgufError::Open(path.display().to_string());
    assert!(
        directions.iter().all(|(il, _)| *il >= 1),
        "direction.0 is not a valid control-vector layer"
    );
    let cpath = super::c_path(path).ok_or_else(err)?;
    let ckeys = [
        c"general.architecture",
        c"controlvector.model_hint",
        c"controlvector.layer_count",
    ];
    let carch = CString::new("controlvector").expect("no NUL");
    let chint = CString::new(model_hint).map_err(|_| err())?;
    let cextra = match extra {
        Some((k, v)) => Some((
            CString::new(k).map_err(|_| err())?,
            CString::new(v).map_err(|_| err())?,
        )),
        None => None,
    };
    let bytes: usize = directions
        .iter()
        .map(|(_, v)| v.len() * 4 + 512)
        .sum::<usize>()
        + 4096;
    // SAFETY: a fresh gguf context and a ggml context sized for all tensors (data + overhead) are
    // created, filled and freed here; every string is NUL-terminated and outlives its use; tensor
    // data pointers come from ggml_get_data of tensors we just allocated with exactly v.len() f32.
    unsafe {
        let g = sys::gguf_init_empty();
        if g.is_null() {
            return Err(err());
        }
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: bytes,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: false,
        });
        if ctx.is_null() {
            sys::gguf_free(g);
            return Err(err());
        }
        sys::gguf_set_val_str(g, ckeys[0].as_ptr(), carch.as_ptr());
        sys::gguf_set_val_str(g, ckeys[1].as_ptr(), chint.as_ptr());
        sys::gguf_set_val_i32(g, ckeys[2].as_ptr(), directions.len() as i32);
        if let Some(p) = peak_point {
            let key = CString::new(PEAK_POINT_KEY).expect("no NUL");
            sys::gguf_set_val_u32(g, key.as_ptr(), p as u32);
        }
        if let Some((k, v)) = &cextra {
            sys::gguf_set_val_str(g, k.as_ptr(), v.as_ptr());
        }
        for (il, v) in directions {
            let t = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, v.len() as i64);
            let name = CString::new(format!("direction.{il}")).expect("no NUL");
            sys::ggml_set_name(t, name.as_ptr());
            std::ptr::copy_nonoverlapping(v.as_ptr(), sys::ggml_get_data(t).cast::<f32>(), v.len());
            sys::gguf_add_tensor(g, t);
        }
        let ok = sys::gguf_write_to_file(g, cpath.as_ptr(), false);
        sys::ggml_free(ctx);
        sys::gguf_free(g);
        if !ok {
            return Err(GgufError::Io {
                path: path.display().to_string(),
                name: "control vector".into(),
                source: std::io::Error::other("gguf_write_to_file failed"),
            });
        }
    }
    Ok(())
}
