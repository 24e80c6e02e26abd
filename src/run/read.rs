//! Reading a run with bounded memory: arrays row by row (`last.npy` one prompt at a time, or
//! one point of chosen prompts; `logits.npy` one prompt at a time) and `lens.json` one prompt at a
//! time. Nothing here holds all prompts of a run at once, so analysing a run costs memory in
//! proportion to one prompt, not to the run.

use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};

use super::npy::NpyHeader;
use super::{PromptLens, Run, RunError, LAST_NPY, LENS_JSON, LOGITS_NPY};

/// An `.npy` array of `<f4` or `<f2` elements (C order), read by element ranges as f32.
/// Reads are positioned (`pread`), so one reader serves any order of reads without seeking.
#[derive(Debug)]
pub struct NpyReader {
    file: File,
    path: PathBuf,
    data_offset: u64,
    item: usize,
    /// The file's length when opened: no read reaches beyond it.
    len: u64,
    pub shape: Vec<usize>,
}

impl NpyReader {
    pub fn open(path: &Path) -> Result<NpyReader, RunError> {
        let bad = |msg: String| RunError::Npy {
            path: path.display().to_string(),
            msg,
        };
        let h = NpyHeader::read(path).map_err(|e| bad(e.to_string()))?;
        let item = match h.descr.as_str() {
            "<f4" => 4,
            "<f2" => 2,
            d => return Err(bad(format!("element type {d}, expected <f4 or <f2"))),
        };
        if h.fortran_order {
            return Err(bad("Fortran-order arrays are not supported".into()));
        }
        let file = File::open(path).map_err(|e| bad(e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        Ok(NpyReader {
            file,
            path: path.to_path_buf(),
            data_offset: h.data_offset,
            item,
            len,
            shape: h.shape,
        })
    }

    /// `len` elements starting at element `start`, widened to f32 and checked finite (runs hold
    /// finite numbers only).
    pub fn read(&self, start: usize, len: usize) -> Result<Vec<f32>, RunError> {
        // Every long loop over a run reads through here: Ctrl-C stops it promptly.
        if crate::llama::backend::interrupted() {
            return Err(RunError::Interrupted);
        }
        // Offsets come from run.json's shapes: one that does not fit is a damaged run, and no
        // more is allocated than the file holds.
        let range = len
            .checked_mul(self.item)
            .zip(start.checked_mul(self.item))
            .and_then(|(n, s)| Some((n, self.data_offset.checked_add(s as u64)?)))
            .filter(|&(n, at)| at.checked_add(n as u64).is_some_and(|end| end <= self.len));
        let Some((n_bytes, at)) = range else {
            return Err(RunError::Npy {
                path: self.path.display().to_string(),
                msg: format!(
                    "elements {start}..{} lie beyond the end of the file (a damaged run?)",
                    start.saturating_add(len)
                ),
            });
        };
        let mut bytes = vec![0u8; n_bytes];
        self.file
            .read_exact_at(&mut bytes, at)
            .map_err(|e| RunError::Npy {
                path: self.path.display().to_string(),
                msg: format!("reading elements {start}..{}: {e}", start + len),
            })?;
        let out: Vec<f32> = if self.item == 4 {
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        };
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            return Err(RunError::Invalid {
                path: self.path.display().to_string(),
                msg: format!(
                    "holds a NaN or infinite value (element {}); the file is damaged",
                    start + i
                ),
            });
        }
        Ok(out)
    }
}

/// `last.npy` (`[n_prompts, n_points, n_embd]`), one prompt or one point at a time.
#[derive(Debug)]
pub struct LastStates {
    npy: NpyReader,
    pub n_prompts: usize,
    pub n_points: usize,
    pub n_embd: usize,
}

impl LastStates {
    /// Prompt `i`'s trajectory, `[n_points, n_embd]`.
    pub fn prompt(&self, i: usize) -> Result<Array2<f32>, RunError> {
        let len = self.n_points * self.n_embd;
        let v = self.npy.read(i * len, len)?;
        Ok(Array2::from_shape_vec((self.n_points, self.n_embd), v).expect("row length"))
    }

    /// Point `k` (an index into the stored points) of the prompts `rows`, in that order:
    /// `[rows.len(), n_embd]`.
    pub fn point_rows(&self, k: usize, rows: &[usize]) -> Result<Array2<f32>, RunError> {
        let d = self.n_embd;
        let mut out = Array2::<f32>::zeros((rows.len(), d));
        for (r, &i) in rows.iter().enumerate() {
            let v = self.npy.read((i * self.n_points + k) * d, d)?;
            out.row_mut(r).assign(&ndarray::ArrayView1::from(&v[..]));
        }
        Ok(out)
    }
}

/// One prompt's states file (`[n_points, n_positions, n_embd]`), one position or one point at a
/// time: a long prompt traced at every position can be far larger than memory.
#[derive(Debug)]
pub struct PromptStates {
    npy: NpyReader,
    pub n_points: usize,
    pub n_positions: usize,
    pub n_embd: usize,
}

impl PromptStates {
    /// Stored position `j` at every point: `[n_points, n_embd]`.
    pub fn position(&self, j: usize) -> Result<Array2<f32>, RunError> {
        let (t, d) = (self.n_positions, self.n_embd);
        let mut out = Array2::<f32>::zeros((self.n_points, d));
        for k in 0..self.n_points {
            let v = self.npy.read((k * t + j) * d, d)?;
            out.row_mut(k).assign(&ndarray::ArrayView1::from(&v[..]));
        }
        Ok(out)
    }

    /// Point `k` (an index into the stored points) at the stored positions `cols`:
    /// `[cols.len(), n_embd]`.
    pub fn point_positions(&self, k: usize, cols: &[usize]) -> Result<Array2<f32>, RunError> {
        let (t, d) = (self.n_positions, self.n_embd);
        let mut out = Array2::<f32>::zeros((cols.len(), d));
        for (r, &j) in cols.iter().enumerate() {
            let v = self.npy.read((k * t + j) * d, d)?;
            out.row_mut(r).assign(&ndarray::ArrayView1::from(&v[..]));
        }
        Ok(out)
    }
}

/// `logits.npy` (`[n_prompts, n_vocab]`), one prompt at a time.
#[derive(Debug)]
pub struct LogitRows {
    npy: NpyReader,
    pub n_vocab: usize,
}

impl LogitRows {
    pub fn prompt(&self, i: usize) -> Result<Vec<f32>, RunError> {
        self.npy.read(i * self.n_vocab, self.n_vocab)
    }
}

/// Calls `f` on each element of a JSON array read from `reader`, one element in memory at a
/// time; returns how many there were. An error from `f` stops the reading and is returned.
fn for_each_in_array<R, T, F>(path: &Path, reader: R, f: F) -> Result<usize, RunError>
where
    R: std::io::Read,
    T: serde::de::DeserializeOwned,
    F: FnMut(T) -> Result<(), RunError>,
{
    struct Each<T, F> {
        f: F,
        failed: Option<RunError>,
        _t: std::marker::PhantomData<T>,
    }
    impl<'de, T: serde::de::DeserializeOwned, F: FnMut(T) -> Result<(), RunError>> Visitor<'de>
        for &mut Each<T, F>
    {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while let Some(item) = seq.next_element::<T>()? {
                let r = if crate::llama::backend::interrupted() {
                    Err(RunError::Interrupted)
                } else {
                    (self.f)(item)
                };
                if let Err(e) = r {
                    self.failed = Some(e);
                    return Err(A::Error::custom("stopped"));
                }
                n += 1;
            }
            Ok(n)
        }
    }
    impl<'de, T: serde::de::DeserializeOwned, F: FnMut(T) -> Result<(), RunError>>
        DeserializeSeed<'de> for &mut Each<T, F>
    {
        type Value = usize;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
            d.deserialize_seq(self)
        }
    }
    let mut each = Each {
        f,
        failed: None,
        _t: std::marker::PhantomData,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let bad = |source| RunError::Json {
        path: path.display().to_string(),
        source,
    };
    let n = match (&mut each).deserialize(&mut de) {
        Ok(n) => n,
        Err(e) => return Err(each.failed.take().unwrap_or_else(|| bad(e))),
    };
    de.end().map_err(bad)?;
    Ok(n)
}

impl Run {
    /// Reader of `last.npy`, one prompt at a time.
    pub fn last_states(&self) -> Result<LastStates, RunError> {
        let npy = NpyReader::open(&self.dir.join(LAST_NPY))?;
        Ok(LastStates {
            npy,
            n_prompts: self.manifest.prompts.len(),
            n_points: self.manifest.capture.points.len(),
            n_embd: self.manifest.model.n_embd,
        })
    }

    /// Reader of prompt `index`'s states file, a position or a point at a time.
    pub fn prompt_states(&self, index: usize) -> Result<PromptStates, RunError> {
        let rec = &self.manifest.prompts[index];
        let rel = rec.states_file.as_ref().ok_or_else(|| RunError::Npy {
            path: self.dir.display().to_string(),
            msg: "this run was written with --format csv: no NPY states".into(),
        })?;
        Ok(PromptStates {
            npy: NpyReader::open(&self.dir.join(rel))?,
            n_points: self.manifest.capture.points.len(),
            n_positions: rec.positions.len(),
            n_embd: self.manifest.model.n_embd,
        })
    }

    /// Reader of `logits.npy`, one prompt at a time.
    pub fn logit_rows(&self) -> Result<LogitRows, RunError> {
        Ok(LogitRows {
            npy: NpyReader::open(&self.dir.join(LOGITS_NPY))?,
            n_vocab: self.manifest.model.n_vocab,
        })
    }

    /// Calls `f` on each prompt's lens in order, one in memory at a time (runs traced with
    /// --lens; none otherwise). Returns how many lens.json holds.
    pub fn for_each_lens(
        &self,
        f: impl FnMut(PromptLens) -> Result<(), RunError>,
    ) -> Result<usize, RunError> {
        if self.manifest.lens.is_none() {
            return Ok(0);
        }
        let p = self.dir.join(LENS_JSON);
        let file = File::open(&p).map_err(super::io_err(&p))?;
        for_each_in_array(&p, BufReader::new(file), f)
    }
}
