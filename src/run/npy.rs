//! NPY helpers on top of ndarray-npy: an f16 element type, and arrays written row by row.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use ndarray::{ArrayView, Dimension};
use ndarray_npy::{ReadDataError, ReadableElement, WritableElement, WriteDataError};
use py_literal::Value as PyValue;

/// A half-precision float stored as numpy's `<f2`. ndarray-npy has no f16 element type, so we
/// implement its public element traits for this newtype.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(transparent)]
pub struct F16(pub half::f16);

const F16_DESCR: &str = "<f2";

impl WritableElement for F16 {
    fn type_descriptor() -> PyValue {
        PyValue::String(F16_DESCR.into())
    }

    fn write<W: io::Write>(&self, mut writer: W) -> Result<(), WriteDataError> {
        writer.write_all(&self.0.to_le_bytes())?;
        Ok(())
    }

    fn write_slice<W: io::Write>(slice: &[Self], mut writer: W) -> Result<(), WriteDataError> {
        let bytes: Vec<u8> = slice.iter().flat_map(|x| x.0.to_le_bytes()).collect();
        writer.write_all(&bytes)?;
        Ok(())
    }
}

impl ReadableElement for F16 {
    fn read_to_end_exact_vec<R: io::Read>(
        mut reader: R,
        type_desc: &PyValue,
        len: usize,
    ) -> Result<Vec<Self>, ReadDataError> {
        match type_desc {
            PyValue::String(s) if s == F16_DESCR => {}
            other => return Err(ReadDataError::WrongDescriptor(other.clone())),
        }
        let mut bytes = vec![0u8; len * 2];
        reader.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ReadDataError::MissingData
            } else {
                ReadDataError::Io(e)
            }
        })?;
        let mut extra = Vec::new();
        reader.read_to_end(&mut extra)?;
        if !extra.is_empty() {
            return Err(ReadDataError::ExtraBytes(extra.len()));
        }
        Ok(bytes
            .chunks_exact(2)
            .map(|b| F16(half::f16::from_le_bytes([b[0], b[1]])))
            .collect())
    }
}

/// An f32 `.npy` file of shape `[n_rows, ...]` created full of zeros (sparse where the file system
/// allows) and filled row by row at its offset, so arrays larger than memory (the logits of
/// thousands of prompts) stream to disk. The header comes from ndarray-npy's `write_zeroed_npy`.
pub struct NpyRows {
    file: File,
    data_start: u64,
    row_len: usize,
    n_rows: usize,
}

impl NpyRows {
    pub fn create(path: &Path, shape: &[usize]) -> io::Result<NpyRows> {
        let (n_rows, row_len) = (shape[0], shape[1..].iter().product());
        let mut file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        ndarray_npy::write_zeroed_npy::<f32, _>(&file, ndarray::IxDyn(shape))
            .map_err(io::Error::other)?;
        // write_zeroed_npy leaves the cursor right after the header.
        let data_start = file.stream_position()?;
        Ok(NpyRows {
            file,
            data_start,
            row_len,
            n_rows,
        })
    }

    /// Reopen an f32 `.npy` file written by [`NpyRows::create`] (to resume writing rows).
    pub fn open(path: &Path, shape: &[usize]) -> io::Result<NpyRows> {
        let h = NpyHeader::read(path)?;
        if h.descr != "<f4" || h.shape != shape {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "shape {:?} ({}), expected {shape:?} (<f4)",
                    h.shape, h.descr
                ),
            ));
        }
        let file = File::options().read(true).write(true).open(path)?;
        Ok(NpyRows {
            file,
            data_start: h.data_offset,
            row_len: shape[1..].iter().product(),
            n_rows: shape[0],
        })
    }

    /// Write row `i` (any shape whose element count is the row length, e.g. `[n_points, n_embd]`).
    pub fn set_row<D: Dimension>(
        &mut self,
        i: usize,
        row: ArrayView<'_, f32, D>,
    ) -> io::Result<()> {
        assert!(
            i < self.n_rows && row.len() == self.row_len,
            "row {i} of {} with {} values",
            self.n_rows,
            row.len()
        );
        let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.file.seek(SeekFrom::Start(
            self.data_start + (i * self.row_len * 4) as u64,
        ))?;
        self.file.write_all(&bytes)
    }

    /// Flush the file to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// The header of an `.npy` file: element type, shape, and where the data starts.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    /// numpy's type descriptor ("<f4", "<f2").
    pub descr: String,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Byte offset of the first element.
    pub data_offset: u64,
}

impl NpyHeader {
    /// Read and parse the header of `path` (format versions 1–3), without reading the data.
    pub fn read(path: &Path) -> io::Result<NpyHeader> {
        use std::io::Read;
        let bad = |msg: &str| io::Error::new(io::ErrorKind::InvalidData, msg.to_string());
        let mut f = File::open(path)?;
        let mut pre = [0u8; 10];
        f.read_exact(&mut pre)
            .map_err(|_| bad("too short for an NPY header"))?;
        if &pre[..6] != b"\x93NUMPY" {
            return Err(bad("not an NPY file (bad magic)"));
        }
        let (len, start) = match pre[6] {
            1 => (u16::from_le_bytes([pre[8], pre[9]]) as usize, 10u64),
            2 | 3 => {
                let mut more = [0u8; 2];
                f.read_exact(&mut more)
                    .map_err(|_| bad("truncated NPY header"))?;
                (
                    u32::from_le_bytes([pre[8], pre[9], more[0], more[1]]) as usize,
                    12u64,
                )
            }
            v => return Err(bad(&format!("unsupported NPY version {v}"))),
        };
        if len > 1 << 20 {
            return Err(bad("NPY header too long"));
        }
        // As much as the file holds, not what the header claims.
        let mut text = Vec::new();
        (&mut f).take(len as u64).read_to_end(&mut text)?;
        if text.len() < len {
            return Err(bad("truncated NPY header"));
        }
        let text = String::from_utf8_lossy(&text);
        // An NPY header is a flat dict holding a shape tuple (depth 2). py_literal's parser takes
        // time exponential in the nesting depth ("[[[[…" hangs it), so deeper headers are refused
        // before it sees them; ndarray-npy reads no file whose header this has not passed.
        let mut depth = 0usize;
        for c in text.chars() {
            match c {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth > 4 {
                return Err(bad("unreadable NPY header (nested too deep)"));
            }
        }
        let dict: PyValue = text
            .trim()
            .parse()
            .map_err(|_| bad("unreadable NPY header"))?;
        let PyValue::Dict(items) = dict else {
            return Err(bad("NPY header is not a dict"));
        };
        let get = |k: &str| {
            items
                .iter()
                .find(|(key, _)| matches!(key, PyValue::String(s) if s == k))
                .map(|(_, v)| v)
        };
        let descr = match get("descr") {
            Some(PyValue::String(s)) => s.clone(),
            _ => return Err(bad("NPY header has no descr")),
        };
        let fortran_order = matches!(get("fortran_order"), Some(PyValue::Boolean(true)));
        let shape = match get("shape") {
            Some(PyValue::Tuple(t)) => t
                .iter()
                .map(|v| match v {
                    PyValue::Integer(i) => usize::try_from(i.clone()).ok(),
                    _ => None,
                })
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| bad("NPY shape is not a tuple of sizes"))?,
            _ => return Err(bad("NPY header has no shape")),
        };
        Ok(NpyHeader {
            descr,
            fortran_order,
            shape,
            data_offset: start + len as u64,
        })
    }
}
