//! An inference context with the eval callback that captures the residual stream, and batches.
//!
//! ## How capture works
//! llama.cpp's scheduler calls the eval callback twice per graph node: first with `ask = true`
//! ("do you want to see this tensor?") and, for the tensors we said yes to, with `ask = false` once
//! their data is computed. We want one tensor per *point* (README, "Points"): the input of
//! block 0 and `l_out-0 … l_out-{L-1}`. The callback fires once per ubatch, so each wanted tensor
//! arrives in slices of `ne[1]` rows; we append them per point and the caller maps rows back to
//! (sequence, position) from the batch layout. With `kv_unified = true` llama.cpp splits a batch into
//! contiguous ubatches in batch order, so appended rows are in batch order. The last block computes
//! rows only for tokens marked as outputs, so its slot holds one row per output token.
//!
//! In the data phase the callback always returns true: returning false only cancels the current
//! graph split and llama_decode would still report success with stale results. Problems (a tensor
//! that is not F32, has no buffer, has the wrong width) are recorded and reported after decode.

use std::os::raw::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::backend;
use super::model::Model;
use super::Token;
use crate::capture::taps::Tap;

/// Errors while creating a context or decoding.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("llama.cpp could not create a context{}", .0.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Create(Option<String>),
    #[error("interrupted")]
    Interrupted,
    #[error("the KV cache has no room for this batch (llama_decode returned 1)")]
    NoKvSlot,
    #[error("llama_decode failed with code {code}{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Decode { code: i32, reason: Option<String> },
    #[error("a batch asks for {got} outputs, more than the context's n_outputs_max {max}")]
    TooManyOutputs { got: usize, max: usize },
    #[error("capture failed: {0}")]
    Capture(String),
    #[error("control vector rejected by llama.cpp (code {0})")]
    ControlVector(i32),
}

/// Which tensors to capture: one name per point.
#[derive(Debug, Clone)]
pub struct CaptureSpec {
    /// The model's architecture, for error messages.
    pub arch: String,
    /// Name of the tensor holding the input of block 0 for this architecture.
    pub point0_name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    /// Points to keep (0..=n_layer), sorted, unique.
    pub points: Vec<usize>,
    /// Taps inside blocks to capture, each at its blocks (sorted, unique, < n_layer). Their slots
    /// follow the points' slots, tap by tap, block by block.
    pub taps: Vec<(Tap, Vec<usize>)>,
}

impl CaptureSpec {
    /// (tap, block) of every tap slot, in slot order (after the points' slots).
    fn tap_slots(&self) -> Vec<(Tap, usize)> {
        self.taps
            .iter()
            .flat_map(|(t, blocks)| blocks.iter().map(move |&b| (*t, b)))
            .collect()
    }
}

/// Where a tap's tensor sits in every graph of a context, found by the structural check of the
/// first graph (see [`GraphCheck::identify_block`]): the `occurrence`-th node named `name` after
/// the start of block `block` (the point-0 tensor for block 0, `l_out-{block-1}` after), computed
/// by `op`, `width` values per row, one row per token or (after the last block's output-row
/// selection) per output. Every capture re-checks op and width.
#[derive(Debug, Clone, PartialEq)]
pub struct Locator {
    pub block: usize,
    pub name: Vec<u8>,
    pub occurrence: usize,
    pub op: sys::ggml_op,
    /// Values per row (per head for `pattern`, whose rows are as wide as the KV cache's cells in
    /// use, so they vary from decode to decode: 0 here).
    pub width: usize,
    /// Heads (ne[2]) for `pattern`; 1 for every other tap.
    pub heads: usize,
    pub out_rows: bool,
    /// For `pattern`: the softmax has attention sinks (gpt-oss), a learned logit per head that
    /// joins the normalisation without a key, so a row sums to 1 minus the sink's share.
    pub sinks: bool,
    /// The tensor is `[1, width, n_tokens]` (`router_weights`): a token's values are its ne[1]
    /// values, rows ne[2] apart.
    pub flat: bool,
    /// The tensor holds int32 (`router_experts`), copied as exact f32.
    pub int: bool,
}

/// Callback state: allocated with `Box::into_raw` when the [`Context`] is created, reached only
/// through that raw pointer (by the callback during a decode, by the context between decodes —
/// never both at once, since decoding needs `&mut Context`), and freed in `Drop` after
/// `llama_free`, so it outlives the llama.cpp context that points at it.
struct CaptureState {
    point0: Vec<u8>,
    /// For every point 0..=n_layer, its slot among the kept points.
    slot_of_point: Vec<Option<usize>>,
    n_embd: usize,
    /// Per slot: the captured rows of the current decode, appended ubatch by ubatch.
    rows: Vec<Vec<f32>>,
    /// Per slot: rows the tensor has delivered in the current decode (wanted or not).
    seen: Vec<usize>,
    /// Which rows of the current decode to copy: per batch token for every point but the last
    /// block, per output for the last block (whose tensor holds output rows only). Empty: all.
    wanted: Vec<bool>,
    wanted_out: Vec<bool>,
    /// Index of the slot of the last block's output (point n_layer), if kept.
    last_slot: Option<usize>,
    /// Whether the last block's output holds one row per output (llama.cpp selects the output
    /// rows inside the last block, as most architectures' graphs do) rather than one per batch
    /// token (gpt-oss and cohere2moe select them after it). Structural: read off the first
    /// graph's check (the node `l_out-{n_layer-1}` computed from the selection or not); true
    /// until then.
    last_out_rows: bool,
    /// Per batch token of the current decode: its number among the decode's outputs.
    out_index: Vec<Option<usize>>,
    /// Where the last block's output holds every token's row: the batch tokens its tensor has
    /// delivered so far in this decode, to the copy (0) and to the edit (1).
    last_tokens: [usize; 2],
    /// Bytes copied from backend tensors since the context was created.
    bytes_read: u64,
    error: Option<String>,
    /// The structural check of the first graph (see [`GraphCheck`]); `None` once it is done.
    check: Option<GraphCheck>,
    /// Blocks whose input and output the structural check confirmed.
    blocks_checked: usize,
    /// Per point 0..=n_layer: an intervention written into the stream there (see [`Edit`]).
    edits: Vec<Option<Edit>>,
    /// Rows the current decode wrote back, per point.
    rows_edited: Vec<usize>,
    /// Per tap slot: an intervention written into the tap's tensor (see [`Edit`]), and the rows
    /// the current decode wrote back there.
    tap_edits: Vec<Option<Edit>>,
    tap_rows_edited: Vec<usize>,
    /// Number of point slots (tap slots follow them in `rows` and `seen`).
    n_point_slots: usize,
    /// Per tap slot: (tap, block), and its locator once the first graph identified it.
    tap_slots: Vec<(Tap, usize)>,
    locators: Vec<Locator>,
    /// Matching taps in later graphs: the block whose nodes are being announced, how often each
    /// locator's name occurred in it so far, and the nodes said yes to (pointer, tap slot).
    cur_block: usize,
    counts: Vec<usize>,
    pending: Vec<(usize, usize)>,
    /// Per tap slot of `pattern`: the length of every row copied in the current decode (heads ×
    /// the KV cells in use, which grow from ubatch to ubatch).
    row_lens: Vec<Vec<usize>>,
}

/// An intervention on the residual stream at one point, or on a tap's tensor inside a block,
/// applied in the eval callback's data phase: the tensor is computed and its consumers are not, so
/// what is written back with `ggml_backend_tensor_set` is what the next op reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Directional ablation (Arditi et al., 2024): h ← h − (h·r̂) r̂ at every row, r̂ of unit
    /// length (n_embd values).
    Ablate(Vec<f32>),
    /// Activation patching: row i of the decode (batch token i; output i at the last block)
    /// becomes `rows[i]` where it is `Some`.
    Replace(Vec<Option<Vec<f32>>>),
    /// Every row: `row[start..start + v.len()] = v` for each `(start, v)` (a head's slice of the
    /// `z` tap: zeros, or its mean over a reference run).
    SetSlices(Vec<(usize, Vec<f32>)>),
    /// As `Replace`, but only the columns `start..end` of each range are taken from `rows[i]`
    /// (patching some heads' slices of `z`).
    ReplaceCols(Vec<Option<Vec<f32>>>, Vec<(usize, usize)>),
}

impl Edit {
    /// The new value of decode row `i`, given its computed value `row`; false: leave it.
    fn apply(&self, i: usize, row: &mut [f32]) -> bool {
        match self {
            Edit::Ablate(r) => {
                let dot: f64 = row.iter().zip(r).map(|(&h, &d)| h as f64 * d as f64).sum();
                for (h, &d) in row.iter_mut().zip(r) {
                    *h = (*h as f64 - dot * d as f64) as f32;
                }
                true
            }
            Edit::Replace(rows) => match rows.get(i).and_then(Option::as_ref) {
                Some(v) if v.len() == row.len() => {
                    row.copy_from_slice(v);
                    true
                }
                _ => false,
            },
            Edit::SetSlices(slices) => {
                for (start, v) in slices {
                    if let Some(dst) = row.get_mut(*start..*start + v.len()) {
                        dst.copy_from_slice(v);
                    }
                }
                true
            }
            Edit::ReplaceCols(rows, cols) => match rows.get(i).and_then(Option::as_ref) {
                Some(v) if v.len() == row.len() => {
                    for &(a, b) in cols {
                        if let (Some(dst), Some(src)) = (row.get_mut(a..b), v.get(a..b)) {
                            dst.copy_from_slice(src);
                        }
                    }
                    true
                }
                _ => false,
            },
        }
    }

    /// Whether every write of this edit fits a row of `width` values.
    fn fits(&self, width: usize) -> bool {
        match self {
            Edit::Ablate(r) => r.len() == width,
            Edit::Replace(rows) => rows.iter().flatten().all(|v| v.len() == width),
            Edit::ReplaceCols(rows, cols) => {
                rows.iter().flatten().all(|v| v.len() == width)
                    && cols.iter().all(|&(a, b)| a <= b && b <= width)
            }
            Edit::SetSlices(slices) => slices.iter().all(|(s, v)| s + v.len() <= width),
        }
    }
}

impl CaptureState {
    /// The point a tensor name holds (0..=n_layer), if any.
    fn point_for(&self, name: &[u8]) -> Option<usize> {
        if name == self.point0.as_slice() {
            return Some(0);
        }
        let rest = name.strip_prefix(b"l_out-")?;
        let il: usize = std::str::from_utf8(rest).ok()?.parse().ok()?;
        (il + 1 < self.slot_of_point.len()).then_some(il + 1)
    }

    /// Check that `t` is a tensor we can read and write: F32 (I32 when `int`), `[width, rows]`,
    /// rows of contiguous values, in a backend buffer; with `flat`, `[1, width, rows]` with each
    /// row's values contiguous. Returns (rows, bytes between rows).
    fn layout(
        &mut self,
        t: &sys::ggml_tensor,
        width: usize,
        (flat, int): (bool, bool),
    ) -> Option<(usize, usize)> {
        let name = tensor_name(t);
        let ty = if int {
            sys::GGML_TYPE_I32
        } else {
            sys::GGML_TYPE_F32
        };
        if t.type_ != ty {
            self.fail(format!(
                "tensor {name} is {}, expected {}",
                super::ggml_type_name(t.type_),
                super::ggml_type_name(ty)
            ));
            return None;
        }
        if flat {
            if t.ne[0] != 1 || t.ne[1] as usize != width || t.ne[3] != 1 || t.nb[1] != 4 {
                self.fail(format!(
                    "tensor {name} has shape {:?} (strides {:?}), expected [1, {width}, n_tokens, 1] with contiguous rows",
                    t.ne, t.nb
                ));
                return None;
            }
        } else if t.ne[0] as usize != width || t.ne[2] != 1 || t.ne[3] != 1 {
            self.fail(format!(
                "tensor {name} has shape {:?}, expected [{width}, n_tokens, 1, 1]",
                t.ne
            ));
            return None;
        }
        if t.nb[0] != 4 {
            self.fail(format!(
                "tensor {name} is not contiguous within a row (nb[0] = {})",
                t.nb[0]
            ));
            return None;
        }
        let buffer = if t.view_src.is_null() {
            t.buffer
        } else {
            // SAFETY: view_src, when set, points to the live source tensor of this view.
            unsafe { (*t.view_src).buffer }
        };
        if buffer.is_null() {
            self.fail(format!("tensor {name} has no backend buffer"));
            return None;
        }
        Some(if flat {
            (t.ne[2] as usize, t.nb[2])
        } else {
            (t.ne[1] as usize, t.nb[1])
        })
    }

    /// Apply the edit of `point` to every row of the computed tensor `raw` and write it back.
    ///
    /// # Safety
    /// As for [`CaptureState::copy`]: `raw` is the computed, live tensor the callback was handed in
    /// the data phase.
    unsafe fn edit(&mut self, raw: *mut sys::ggml_tensor, point: usize) {
        // SAFETY: raw is the live tensor handed to the callback (see the caller).
        let t = unsafe { &*raw };
        let Some((ne1, nb1)) = self.layout(t, self.n_embd, (false, false)) else {
            return;
        };
        let Some(edit) = self.edits.get_mut(point).and_then(Option::take) else {
            return;
        };
        let first = self.rows_edited[point];
        // The last block's output with every token's row: edits are numbered by output (as
        // where llama.cpp selected the output rows); rows of other tokens reach no output.
        let by_token = (point + 1 == self.slot_of_point.len() && !self.last_out_rows).then(|| {
            let t0 = self.last_tokens[1];
            self.last_tokens[1] += ne1;
            t0
        });
        // SAFETY: as for this function; the layout was just checked.
        unsafe { self.write_rows(raw, (ne1, nb1), self.n_embd, &edit, first, by_token) };
        self.edits[point] = Some(edit);
        self.rows_edited[point] += match by_token {
            Some(t0) => self.outputs_among(t0, ne1),
            None => ne1,
        };
    }

    /// Apply tap slot `k`'s edit to the computed tensor `raw` (a tap's node, matched in the ask
    /// phase) and write it back.
    ///
    /// # Safety
    /// As for [`CaptureState::edit`].
    unsafe fn edit_tap(&mut self, raw: *mut sys::ggml_tensor, k: usize) {
        let Some(edit) = self.tap_edits.get_mut(k).and_then(Option::take) else {
            return;
        };
        let l = &self.locators[k];
        let (tap, block) = self.tap_slots[k];
        if l.width == 0 || l.flat || l.int || !edit.fits(l.width) {
            self.fail(format!(
                "tap `{tap}` at block {block} cannot take this intervention (its rows hold {} values)",
                l.width
            ));
            return;
        }
        let width = l.width;
        // SAFETY: raw is the live tensor handed to the callback (see the caller).
        let t = unsafe { &*raw };
        let Some(shape) = self.layout(t, width, (false, false)) else {
            return;
        };
        let first = self.tap_rows_edited[k];
        // SAFETY: as for this function; the layout was just checked.
        unsafe { self.write_rows(raw, shape, width, &edit, first, None) };
        self.tap_edits[k] = Some(edit);
        self.tap_rows_edited[k] += shape.0;
    }

    /// Apply `edit` to the `ne1` rows of `width` f32 (`nb1` bytes apart) of the computed tensor
    /// `raw` and write back the rows it changed. Row r is the edit's row `first + r`, or, with
    /// `by_token = Some(t0)`, the output that batch token `t0 + r` is (rows of non-outputs are left).
    ///
    /// # Safety
    /// As for [`CaptureState::copy`], and `(ne1, nb1)` is `raw`'s layout as
    /// [`CaptureState::layout`] checked it for `width`.
    unsafe fn write_rows(
        &self,
        raw: *mut sys::ggml_tensor,
        (ne1, nb1): (usize, usize),
        width: usize,
        edit: &Edit,
        first: usize,
        by_token: Option<usize>,
    ) {
        // SAFETY: raw is the live tensor handed to the callback (see the caller).
        let t = unsafe { &*raw };
        let n = width;
        let row_bytes = n * 4;
        // Packed rows move in one transfer each way (a device copy on a GPU or RPC backend);
        // strided rows one by one.
        let step = if nb1 == row_bytes { ne1 } else { 1 };
        let mut buf = vec![0f32; n * step];
        let mut r = 0;
        while r < ne1 {
            let rows = step.min(ne1 - r);
            let bytes = row_bytes * rows;
            // SAFETY: the tensor is computed and in a buffer, and holds ne1 rows of n contiguous
            // f32 starting every nb1 bytes (layout checked); rows r..r+rows lie within it (one row,
            // or all rows when packed: nb1 == row_bytes), and buf has n*rows f32 slots.
            // ggml_backend_tensor_get/set copy from/to host or device memory through
            // tensor->data (the struct itself is not written); nothing reads the tensor until the
            // callback returns, so the write is what the next op reads.
            unsafe {
                sys::ggml_backend_tensor_get(t, buf.as_mut_ptr().cast::<c_void>(), r * nb1, bytes);
            }
            let mut changed = false;
            for (k, row) in buf[..n * rows].chunks_exact_mut(n).enumerate() {
                let i = match by_token {
                    Some(t0) => match self.out_index.get(t0 + r + k).copied().flatten() {
                        Some(o) => o,
                        None => continue,
                    },
                    None => first + r + k,
                };
                changed |= edit.apply(i, row);
            }
            if changed {
                // SAFETY: raw is the callback's own mutable tensor pointer, live until the callback
                // returns; the same rows r..r+rows (offset r*nb1, length bytes) were just read
                // from it, and nothing reads the tensor before the callback returns.
                unsafe {
                    sys::ggml_backend_tensor_set(
                        raw,
                        buf.as_ptr().cast::<c_void>(),
                        r * nb1,
                        bytes,
                    );
                }
            }
            r += rows;
        }
    }

    /// How many of the batch tokens `t0..t0 + n` of the current decode are outputs.
    fn outputs_among(&self, t0: usize, n: usize) -> usize {
        (t0..t0 + n)
            .filter(|&i| self.out_index.get(i).copied().flatten().is_some())
            .count()
    }

    /// Copy a computed tensor's rows.
    ///
    /// # Safety
    /// `t` is a live tensor handed to the eval callback by llama.cpp's scheduler in the data phase
    /// (`ask == false`): its data is computed, and `view_src`, when set, points to its live source.
    unsafe fn copy(&mut self, t: &sys::ggml_tensor, slot: usize) {
        if let Some(k) = slot.checked_sub(self.n_point_slots) {
            if self.locators[k].width == 0 {
                // SAFETY: as for this function.
                unsafe { self.copy_heads(t, slot, k) };
                return;
            }
        }
        let last = Some(slot) == self.last_slot;
        let (ne0, out_rows, kind) = match slot.checked_sub(self.n_point_slots) {
            None => (self.n_embd, last, (false, false)),
            Some(k) => {
                let l = &self.locators[k];
                (l.width, l.out_rows, (l.flat, l.int))
            }
        };
        let Some((ne1, nb_row)) = self.layout(t, ne0, kind) else {
            return;
        };
        // Only the rows the caller stores are read from the backend (on a GPU or an RPC server
        // each read is a transfer): maximal runs of wanted rows, one get per run.
        // The last block's output with every token's row (`last_out_rows` false): only output
        // rows are counted and copied, numbered as outputs, as where llama.cpp selected them.
        let by_token = (last && !self.last_out_rows).then(|| {
            let t0 = self.last_tokens[0];
            self.last_tokens[0] += ne1;
            t0
        });
        let first = self.seen[slot];
        self.seen[slot] += match by_token {
            Some(t0) => self.outputs_among(t0, ne1),
            None => ne1,
        };
        let wanted = if out_rows {
            &self.wanted_out
        } else {
            &self.wanted
        };
        let out_index = &self.out_index;
        let want = |r: usize| {
            let i = match by_token {
                Some(t0) => match out_index.get(t0 + r).copied().flatten() {
                    Some(o) => o,
                    None => return false,
                },
                None => first + r,
            };
            wanted.is_empty() || wanted.get(i).copied().unwrap_or(false)
        };
        let row_bytes = ne0 * 4;
        let rows = &mut self.rows[slot];
        let mut r = 0;
        while r < ne1 {
            if !want(r) {
                r += 1;
                continue;
            }
            let mut end = r + 1;
            // A run of consecutive rows is one contiguous byte range when rows are packed.
            while end < ne1 && want(end) && nb_row == row_bytes {
                end += 1;
            }
            let start = rows.len();
            rows.resize(start + ne0 * (end - r), 0.0);
            let dst = &mut rows[start..];
            // SAFETY: the tensor is computed (data phase), has a buffer (checked), and holds ne1
            // rows of ne0 contiguous 4-byte values (f32, or i32 when `int`: type and nb[0], or
            // for a flat tensor nb[1], checked) starting every nb_row bytes; rows r..end lie
            // within it, and when end > r + 1 they are packed (nb_row == row_bytes), so the range
            // r*nb_row .. + (end-r)*row_bytes is inside the tensor. dst has exactly (end-r)*ne0
            // 4-byte slots. ggml_backend_tensor_get copies from host or device memory.
            unsafe {
                sys::ggml_backend_tensor_get(
                    t,
                    dst.as_mut_ptr().cast::<c_void>(),
                    r * nb_row,
                    row_bytes * (end - r),
                );
            }
            if kind.1 {
                // The bytes are i32: reinterpret each and convert (exact: expert numbers).
                for x in dst.iter_mut() {
                    *x = x.to_bits() as i32 as f32;
                }
            }
            self.bytes_read += (row_bytes * (end - r)) as u64;
            r = end;
        }
    }

    /// Copy an attention-probability tensor `[n_kv, n_tokens, n_head]`: for every wanted token
    /// row, every head's n_kv values, head after head (one row of `row_lens`).
    ///
    /// # Safety
    /// As for [`CaptureState::copy`].
    unsafe fn copy_heads(&mut self, t: &sys::ggml_tensor, slot: usize, k: usize) {
        let name = tensor_name(t);
        let heads = self.locators[k].heads;
        if t.type_ != sys::GGML_TYPE_F32
            || t.nb[0] != 4
            || t.ne[3] != 1
            || t.ne[2] as usize != heads
        {
            self.fail(format!(
                "tensor {name} ({}, shape {:?}) is not f32 [n_kv, n_tokens, {heads}] with contiguous rows",
                super::ggml_type_name(t.type_),
                t.ne
            ));
            return;
        }
        let buffer = if t.view_src.is_null() {
            t.buffer
        } else {
            // SAFETY: view_src, when set, points to the live source tensor of this view.
            unsafe { (*t.view_src).buffer }
        };
        if buffer.is_null() {
            self.fail(format!("tensor {name} has no backend buffer"));
            return;
        }
        let (ne0, ne1) = (t.ne[0] as usize, t.ne[1] as usize);
        let first = self.seen[slot];
        self.seen[slot] += ne1;
        let wanted = if self.locators[k].out_rows {
            &self.wanted_out
        } else {
            &self.wanted
        };
        let want: Vec<bool> = (0..ne1)
            .map(|r| wanted.is_empty() || wanted.get(first + r).copied().unwrap_or(false))
            .collect();
        for (r, _) in want.iter().enumerate().filter(|(_, &w)| w) {
            let rows = &mut self.rows[slot];
            let start = rows.len();
            rows.resize(start + ne0 * heads, 0.0);
            for h in 0..heads {
                let dst = &mut rows[start + h * ne0..start + (h + 1) * ne0];
                // SAFETY: the tensor is computed (data phase), f32 with contiguous rows (nb[0] = 4,
                // checked) and in a buffer; row r < ne1 of head h < ne2 starts at r*nb[1] +
                // h*nb[2] and holds ne0 values, all inside the tensor; dst has exactly ne0 slots.
                unsafe {
                    sys::ggml_backend_tensor_get(
                        t,
                        dst.as_mut_ptr().cast::<c_void>(),
                        r * t.nb[1] + h * t.nb[2],
                        ne0 * 4,
                    );
                }
            }
            self.bytes_read += (ne0 * heads * 4) as u64;
            self.row_lens[k].push(ne0 * heads);
        }
    }

    fn fail(&mut self, msg: String) {
        if self.error.is_none() {
            self.error = Some(msg);
        }
    }
}

fn tensor_name(t: &sys::ggml_tensor) -> String {
    let bytes: Vec<u8> = t
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The structural self-check: proof from the graph llama.cpp built that the tensors we capture
/// are the residual stream, so that no architecture can be traced with a silently wrong point.
///
/// In the ask phase the callback sees every node of the graph in execution order, with its
/// sources. For the first graph of a context we record each node's op, its sources, and whether
/// some *computing* op consumes it (anything but the residual plumbing: `ADD`, `GET_ROWS` of the
/// output rows, views and copies). Then, when `l_out-N` is announced, we walk back from it through
/// the plumbing only. What the walk reaches is the residual stream of block N plus the values
/// added to it; the earliest of those that a computing op reads (block N's first norm reads its
/// input) is the block's input. It must be the tensor we capture as point N: for block 0 the
/// architecture's point-0 name (the walk does not stop there, so a position embedding added after
/// `embd`, a scale or a norm is found), for block N > 0 `l_out-{N-1}` (the walk stops there).
///
/// On GPU or RPC backends a source living on another backend is a copy named
/// `BACKEND#name#n`; it is resolved to the node of that name.
struct GraphCheck {
    arch: String,
    point0: Vec<u8>,
    n_layer: usize,
    nodes: Vec<GraphNode>,
    by_ptr: std::collections::HashMap<usize, usize>,
    by_name: std::collections::HashMap<Vec<u8>, usize>,
    /// The span being announced (see [`Span`]): its block, and each name's count in it so far.
    span: Span,
    /// Taps asked for, per tap slot, and what the check found for each.
    taps: Vec<(Tap, usize)>,
    found: Vec<Option<Locator>>,
}

/// Which block's nodes are being announced, tracked the same way while checking the first graph
/// and while matching locators in later ones: the point-0 tensor starts block 0, `l_out-k` ends
/// block k and starts block k + 1.
#[derive(Default)]
struct Span {
    block: usize,
    counts: std::collections::HashMap<Vec<u8>, usize>,
}

impl Span {
    /// The (block, occurrence) of a node named `name`, then the span event its name is.
    fn next(&mut self, name: &[u8], point0: &[u8]) -> (usize, usize) {
        let c = self.counts.entry(name.to_vec()).or_insert(0);
        let at = (self.block, *c);
        *c += 1;
        if let Some(b) = span_event(name, point0) {
            self.block = b;
            self.counts.clear();
        }
        at
    }
}

/// The block a node named `name` starts: 0 for the point-0 tensor, k + 1 for `l_out-k`.
fn span_event(name: &[u8], point0: &[u8]) -> Option<usize> {
    if name == point0 {
        return Some(0);
    }
    name.strip_prefix(b"l_out-")
        .and_then(|r| std::str::from_utf8(r).ok()?.parse::<usize>().ok())
        .map(|k| k + 1)
}

struct GraphNode {
    name: Vec<u8>,
    op: sys::ggml_op,
    /// Sources that are nodes of this graph (weights and inputs are not).
    srcs: Vec<usize>,
    /// Every source by position: its node, or None for a weight or input.
    pos_srcs: Vec<Option<usize>>,
    /// Names of the sources that are not nodes (weights, inputs), by position.
    leafs: Vec<Option<Vec<u8>>>,
    /// Read by an op that computes (not residual plumbing).
    computed_from: bool,
    /// Computed after llama.cpp's selection of output rows: one row per output, not per token.
    out_rows: bool,
    /// Values per row (ne[0]), ne[1], and ne[2] (heads of an attention tensor).
    ne0: usize,
    ne1: usize,
    ne2: usize,
    /// A softmax with attention sinks (`ggml_soft_max_add_sinks`: its third source is set).
    sinks: bool,
    /// (block, occurrence of its name in that block's span): where a [`Locator`] finds it.
    at: (usize, usize),
}

/// The index of block `b` a weight name belongs to (`blk.{b}.…`).
fn weight_block(name: &[u8]) -> Option<usize> {
    let rest = name.strip_prefix(b"blk.")?;
    let end = rest.iter().position(|&c| c == b'.')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Ops the residual stream passes through between blocks: the residual sum, the selection of
/// output rows before the last block's end, and layout-only ops.
fn plumbing(op: sys::ggml_op) -> bool {
    op == sys::GGML_OP_ADD || op == sys::GGML_OP_GET_ROWS || layout_only(op)
}

/// Ops that only change how values are laid out.
fn layout_only(op: sys::ggml_op) -> bool {
    matches!(
        op,
        sys::GGML_OP_VIEW
            | sys::GGML_OP_RESHAPE
            | sys::GGML_OP_CONT
            | sys::GGML_OP_CPY
            | sys::GGML_OP_PERMUTE
            | sys::GGML_OP_TRANSPOSE
    )
}

impl GraphCheck {
    fn new(spec: &CaptureSpec) -> GraphCheck {
        let taps = spec.tap_slots();
        GraphCheck {
            arch: spec.arch.clone(),
            point0: spec.point0_name.as_bytes().to_vec(),
            n_layer: spec.n_layer,
            nodes: Vec::new(),
            by_ptr: Default::default(),
            by_name: Default::default(),
            span: Span::default(),
            found: vec![None; taps.len()],
            taps,
        }
    }

    /// Forget the nodes recorded so far.
    fn reset(&mut self) {
        self.nodes.clear();
        self.by_ptr.clear();
        self.by_name.clear();
        self.span = Span::default();
        self.found.iter_mut().for_each(|f| *f = None);
    }

    /// The node a source pointer stands for: a node seen earlier, or the node a split copy
    /// (`BACKEND#name#n`) was made from.
    fn resolve(&self, ptr: usize, name: &[u8]) -> Option<usize> {
        if let Some(&i) = self.by_ptr.get(&ptr) {
            return Some(i);
        }
        let mut parts = name.splitn(2, |&c| c == b'#');
        let (_backend, rest) = (parts.next()?, parts.next()?);
        let end = rest.iter().rposition(|&c| c == b'#')?;
        self.by_name.get(&rest[..end]).copied()
    }

    /// Mark node `i` as read by a computing op, and through layout-only ops what they show.
    fn mark_read(&mut self, mut i: usize) {
        loop {
            self.nodes[i].computed_from = true;
            match (layout_only(self.nodes[i].op), self.nodes[i].srcs.first()) {
                (true, Some(&s)) => i = s,
                _ => break,
            }
        }
    }

    /// Record node `t` (named `name`, with sources `srcs` as (pointer, name)). Returns the
    /// outcome of a check when `t` is a block output: `Ok(Some(n))` when block n checked out.
    fn add(
        &mut self,
        ptr: usize,
        name: &[u8],
        op: sys::ggml_op,
        (ne0, ne1, ne2): (usize, usize, usize),
        srcs: &[(usize, Vec<u8>)],
        sinks: bool,
    ) -> Result<Option<usize>, String> {
        if self.by_ptr.contains_key(&ptr) {
            // A node seen before: the first graph ended and another began (the next ubatch)
            // before every block was announced.
            return Err(self.missing_block());
        }
        let follow = if op == sys::GGML_OP_GET_ROWS {
            1 // the rows selected, not the ids
        } else {
            srcs.len()
        };
        let mut resolved = Vec::new();
        let mut pos_srcs = Vec::new();
        let mut leafs = Vec::new();
        for (k, (p, n)) in srcs.iter().enumerate() {
            let r = self.resolve(*p, n);
            if let Some(i) = r {
                if !plumbing(op) {
                    self.mark_read(i);
                }
                if k < follow {
                    resolved.push(i);
                }
            }
            pos_srcs.push(r);
            leafs.push(r.is_none().then(|| n.clone()));
        }
        // llama.cpp selects the output rows (`inp_out_ids`, an input) from a computed tensor
        // before the last block's end; everything computed from that has one row per output.
        let selects_outputs = op == sys::GGML_OP_GET_ROWS
            && pos_srcs.first().is_some_and(Option::is_some)
            && pos_srcs.get(1).is_some_and(Option::is_none);
        let out_rows =
            selects_outputs || pos_srcs.iter().flatten().any(|&i| self.nodes[i].out_rows);
        let at = self.span.next(name, &self.point0);
        let idx = self.nodes.len();
        self.nodes.push(GraphNode {
            name: name.to_vec(),
            op,
            srcs: resolved,
            pos_srcs,
            leafs,
            computed_from: false,
            out_rows,
            ne0,
            ne1,
            ne2,
            sinks,
            at,
        });
        self.by_ptr.insert(ptr, idx);
        // A split copy is made from the latest node of its name (llama.cpp reuses some names).
        self.by_name.insert(name.to_vec(), idx);
        let Some(block) = name
            .strip_prefix(b"l_out-")
            .and_then(|r| std::str::from_utf8(r).ok()?.parse::<usize>().ok())
        else {
            return Ok(None);
        };
        let stop = (block > 0).then(|| format!("l_out-{}", block - 1).into_bytes());
        let input = self.block_input(idx, stop.as_deref());
        let expected = stop.as_deref().unwrap_or(&self.point0);
        let shown = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
        match input {
            Some(i) if self.nodes[i].name == expected => {
                self.check_weights(block, idx)?;
                if self.taps.iter().any(|&(_, b)| b == block) {
                    self.identify_block(block, idx, i)?;
                }
                Ok(Some(block))
            }
            found => {
                let found = match found {
                    Some(i) if self.nodes[i].name.is_empty() => format!(
                        "an unnamed {} tensor",
                        super::ggml_op_name(self.nodes[i].op)
                    ),
                    Some(i) => format!(
                        "`{}` ({})",
                        shown(&self.nodes[i].name),
                        super::ggml_op_name(self.nodes[i].op)
                    ),
                    None => "not identifiable".into(),
                };
                Err(if block == 0 {
                    format!(
                        "point-0 self-check failed for architecture `{}`: in llama.cpp's graph the input of block 0 is {found}, not `{}`, the tensor gguf-trace would capture as point 0; this architecture cannot be traced until src/capture/arch.rs names it",
                        self.arch,
                        shown(&self.point0)
                    )
                } else {
                    format!(
                        "residual self-check failed for architecture `{}`: in llama.cpp's graph the input of block {block} is {found}, not `{}`, so `l_out-*` is not this architecture's residual stream",
                        self.arch,
                        shown(expected)
                    )
                })
            }
        }
    }

    /// The error when a graph ended before announcing every block's output.
    fn missing_block(&self) -> String {
        let next = (0..self.n_layer)
            .find(|b| !self.by_name.contains_key(format!("l_out-{b}").as_bytes()))
            .unwrap_or(self.n_layer);
        format!(
            "residual self-check failed for architecture `{}`: llama.cpp's graph has no `l_out-{next}`, so block {next}'s output cannot be captured",
            self.arch
        )
    }

    /// The input of the block whose output is node `out`: walk back through plumbing (not past
    /// `stop`), and take the earliest reached node that a computing op reads.
    fn block_input(&self, out: usize, stop: Option<&[u8]>) -> Option<usize> {
        let mut seen = vec![false; self.nodes.len()];
        let mut stack = vec![out];
        let mut best: Option<usize> = None;
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            let node = &self.nodes[i];
            if i != out && node.computed_from && best.is_none_or(|b| i < b) {
                best = Some(i);
            }
            let at_stop = stop.is_some_and(|s| s == node.name.as_slice());
            if (i == out || plumbing(node.op)) && !at_stop {
                stack.extend(node.srcs.iter().copied());
            }
        }
        best
    }
}

impl GraphCheck {
    /// Nodes announced in block `block`'s span up to `out` (its output), newest first.
    fn span_nodes(&self, block: usize, out: usize) -> impl Iterator<Item = usize> + '_ {
        (0..=out)
            .rev()
            .take_while(move |&i| self.nodes[i].at.0 == block)
    }

    /// Every weight block `block` reads between `l_out-{block-1}` and `l_out-{block}` must be
    /// block `block`'s own (`blk.{block}.…`): a tensor labelled `l_out` in the middle of a block
    /// leaves the rest of that block's weights in the next span.
    fn check_weights(&self, block: usize, out: usize) -> Result<(), String> {
        for i in self.span_nodes(block, out) {
            for w in self.nodes[i].leafs.iter().flatten() {
                if let Some(b) = weight_block(w).filter(|&b| b != block) {
                    return Err(format!(
                        "residual self-check failed for architecture `{}`: between the input and the output of block {block} llama.cpp's graph reads block {b}'s weight `{}`, so the tensors gguf-trace captures there are not block {block}'s boundaries",
                        self.arch,
                        String::from_utf8_lossy(w)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The weights read on the way back from node `from` (not past `input`, nor through `stop`
    /// nodes), and the `stop` nodes the walk reached.
    fn reads(&self, from: usize, input: usize, stop: &[usize]) -> (Vec<&[u8]>, Vec<usize>) {
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![from];
        let mut weights = Vec::new();
        let mut reached = Vec::new();
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            if i != from && stop.contains(&i) {
                reached.push(i);
                continue;
            }
            let n = &self.nodes[i];
            weights.extend(n.leafs.iter().flatten().map(Vec::as_slice));
            stack.extend(n.pos_srcs.iter().flatten().copied().filter(|&s| s > input));
        }
        (weights, reached)
    }

    /// A mixture-of-experts block's router tensors: the logits are the product with the block's
    /// `ffn_gate_inp` weight (plus its bias, when the model adds one); the chosen experts are the
    /// ids the experts' down projection (`MUL_MAT_ID` with `ffn_down_exps`) selects by; their
    /// weights the other factor of the product that scales that projection's output.
    fn router_node(&self, block: usize, out: usize, tap: Tap) -> Result<usize, String> {
        let span: Vec<usize> = self.span_nodes(block, out).collect();
        // The nodes of the block computed by `op` whose first operand is the weight `name`.
        let products = |op: sys::ggml_op, name: &str| -> Vec<usize> {
            span.iter()
                .copied()
                .filter(|&i| {
                    let n = &self.nodes[i];
                    n.op == op && matches!(n.leafs.first(), Some(Some(w)) if w.as_slice() == name.as_bytes())
                })
                .collect()
        };
        let one = |hits: Vec<usize>, what: &str| {
            match hits.as_slice() {
            [i] => Ok(*i),
            [] => Err(format!(
                "no {what}: block {block} is not a mixture-of-experts block (the router taps need one; choose such blocks with --points)"
            )),
            _ => Err(format!("{} {what}s in the block", hits.len())),
        }
        };
        if tap == Tap::RouterLogits {
            let gate = format!("blk.{block}.ffn_gate_inp.weight");
            let bias = format!("blk.{block}.ffn_gate_inp.bias");
            let logits = one(
                products(sys::GGML_OP_MUL_MAT, &gate),
                &format!("matrix product with `{gate}`"),
            )?;
            let biased: Vec<usize> = span
                .iter()
                .copied()
                .filter(|&i| {
                    let n = &self.nodes[i];
                    n.op == sys::GGML_OP_ADD
                        && n.pos_srcs.contains(&Some(logits))
                        && n.leafs
                            .iter()
                            .flatten()
                            .any(|w| w.as_slice() == bias.as_bytes())
                })
                .collect();
            return match biased.as_slice() {
                [] => Ok(logits),
                _ => one(biased, &format!("sum with `{bias}`")),
            };
        }
        let down_w = format!("blk.{block}.ffn_down_exps.weight");
        let down = one(
            products(sys::GGML_OP_MUL_MAT_ID, &down_w),
            &format!("expert product with `{down_w}`"),
        )?;
        if tap == Tap::RouterExperts {
            return self.nodes[down]
                .pos_srcs
                .get(2)
                .copied()
                .flatten()
                .ok_or_else(|| {
                    format!(
                        "the expert ids of the product with `{down_w}` are not a computed tensor"
                    )
                });
        }
        // The experts' outputs (the product, or it plus the experts' biases) times the weights.
        let outputs: Vec<usize> = std::iter::once(down)
            .chain(span.iter().copied().filter(|&i| {
                self.nodes[i].op == sys::GGML_OP_ADD_ID
                    && self.nodes[i].pos_srcs.first() == Some(&Some(down))
            }))
            .collect();
        let scaled: Vec<usize> = span
            .iter()
            .copied()
            .filter(|&i| {
                let n = &self.nodes[i];
                n.op == sys::GGML_OP_MUL
                    && n.pos_srcs
                        .first()
                        .copied()
                        .flatten()
                        .is_some_and(|s| outputs.contains(&s))
            })
            .collect();
        let mul = one(scaled, "product of the experts' outputs with their weights")?;
        self.nodes[mul]
            .pos_srcs
            .get(1)
            .copied()
            .flatten()
            .ok_or_else(|| "the experts' weights are not a computed tensor".to_string())
    }

    /// Whether softmax node `sm` normalises attention scores: back from its input through the
    /// element-wise steps scores take (scale, soft-capping, bias) to a matrix product one of whose
    /// operands is, through layout-only ops, the K cache `cache` (a router's softmax reads a
    /// product with its gate weights instead).
    fn scores_read(&self, sm: usize, cache: &[u8]) -> bool {
        let through_layout = |from: usize| {
            let mut stack = vec![from];
            while let Some(i) = stack.pop() {
                let n = &self.nodes[i];
                if n.leafs.iter().flatten().any(|w| w.starts_with(cache)) {
                    return true;
                }
                if layout_only(n.op) {
                    stack.extend(n.pos_srcs.iter().flatten().copied());
                }
            }
            false
        };
        let mut stack: Vec<usize> = self.nodes[sm]
            .pos_srcs
            .first()
            .copied()
            .flatten()
            .into_iter()
            .collect();
        let mut seen = std::collections::HashSet::new();
        while let Some(i) = stack.pop() {
            if !seen.insert(i) {
                continue;
            }
            let n = &self.nodes[i];
            if n.op == sys::GGML_OP_MUL_MAT {
                if n.leafs.iter().flatten().any(|w| w.starts_with(cache))
                    || n.pos_srcs.iter().flatten().any(|&s| through_layout(s))
                {
                    return true;
                }
            } else if layout_only(n.op)
                || matches!(
                    n.op,
                    sys::GGML_OP_SCALE
                        | sys::GGML_OP_ADD
                        | sys::GGML_OP_MUL
                        | sys::GGML_OP_DIV
                        | sys::GGML_OP_UNARY
                )
            {
                stack.extend(n.pos_srcs.iter().flatten().copied());
            }
        }
        false
    }

    /// Find block `block`'s taps in the graph from its output `out` and input `input`, by
    /// structure: the residual path from input to output, the terms added along it, which
    /// block-`block` weights each term reads (`attn_output` for attention, `ffn_down*` for the
    /// MLP), and the matrix products reading those weights. Records a [`Locator`] for every tap
    /// asked for at this block, or says why a tap cannot be identified.
    fn identify_block(&mut self, block: usize, out: usize, input: usize) -> Result<(), String> {
        let shown = |n: &GraphNode| {
            if n.name.is_empty() {
                format!("an unnamed {}", super::ggml_op_name(n.op))
            } else {
                format!(
                    "`{}` ({})",
                    String::from_utf8_lossy(&n.name),
                    super::ggml_op_name(n.op)
                )
            }
        };
        let fail = |tap: Tap, why: String| {
            format!(
                "tap `{tap}` cannot be identified at block {block} for architecture `{}`: {why}",
                self.arch
            )
        };
        // The residual path: back from the output through plumbing to the input.
        let mut parent: std::collections::HashMap<usize, usize> = Default::default();
        let mut stack = vec![out];
        let mut found_input = false;
        while let Some(i) = stack.pop() {
            if i == input {
                found_input = true;
                break;
            }
            let n = &self.nodes[i];
            if i != out && !plumbing(n.op) {
                continue;
            }
            let follow = if n.op == sys::GGML_OP_GET_ROWS {
                1
            } else {
                n.srcs.len()
            };
            for &s in n.srcs.iter().take(follow) {
                if s >= input && !parent.contains_key(&s) {
                    parent.insert(s, i);
                    stack.push(s);
                }
            }
        }
        let mut path = vec![input];
        if found_input {
            while let Some(&p) = parent.get(path.last().expect("non-empty")) {
                path.push(p);
            }
        }
        // The terms added along the path: (the sum, the term), from input to output.
        let mut terms: Vec<(usize, usize)> = Vec::new();
        for w in path.windows(2) {
            let (prev, node) = (w[0], w[1]);
            let n = &self.nodes[node];
            if n.op != sys::GGML_OP_ADD {
                continue;
            }
            // A term that is not a node (llama.cpp's control vector) is not one of the block's.
            if let Some(t) = n.pos_srcs.iter().flatten().copied().find(|&t| t != prev) {
                terms.push((node, t));
            }
        }
        let attn_w = format!("blk.{block}.attn_output.");
        let mlp_w = format!("blk.{block}.ffn_down");
        let kind = |t: usize, stop: &[usize]| {
            let (ws, reached) = self.reads(t, input, stop);
            let attn = ws.iter().any(|w| w.starts_with(attn_w.as_bytes()));
            let mlp = ws.iter().any(|w| w.starts_with(mlp_w.as_bytes()));
            (attn, mlp, reached)
        };
        let path_nodes: Vec<usize> = path.clone();
        let describe = || {
            terms
                .iter()
                .map(|&(_, t)| shown(&self.nodes[t]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        // (attn_out, mlp_out, resid_mid or why not)
        let split: Result<(usize, usize, Result<usize, String>), String> = match terms.as_slice() {
            [(a1, t1), (_, t2)] => {
                let (k1, k2) = (kind(*t1, &path_nodes), kind(*t2, &path_nodes));
                match ((k1.0, k1.1), (k2.0, k2.1)) {
                    // Sequential: the MLP reads the sum after attention.
                    ((true, false), (false, true)) if k2.2.contains(a1) => Ok((*t1, *t2, Ok(*a1))),
                    ((true, false), (false, true)) | ((false, true), (true, false)) => {
                        let (att, mlp) = if k1.0 { (*t1, *t2) } else { (*t2, *t1) };
                        Ok((att, mlp, Err("this architecture computes attention and the MLP in parallel from the block's input (a parallel residual), so there is no residual between them".to_string())))
                    }
                    _ => Err(format!("the block adds {} to the residual stream, and they are not one attention term and one MLP term", describe())),
                }
            }
            [(_, t)] if self.nodes[*t].op == sys::GGML_OP_ADD => {
                let parts: Vec<usize> = self.nodes[*t].pos_srcs.iter().flatten().copied().collect();
                match parts.as_slice() {
                    [x, y] => {
                        let (kx, ky) = (kind(*x, &path_nodes), kind(*y, &path_nodes));
                        match ((kx.0, kx.1), (ky.0, ky.1)) {
                            ((true, false), (false, true)) | ((false, true), (true, false)) => {
                                let (att, mlp) = if kx.0 { (*x, *y) } else { (*y, *x) };
                                Ok((att, mlp, Err("this architecture computes attention and the MLP in parallel from the block's input (a parallel residual), so there is no residual between them".to_string())))
                            }
                            _ => Err(format!("the block adds one sum, {}, whose parts are not one attention term and one MLP term", shown(&self.nodes[*t]))),
                        }
                    }
                    _ => Err(format!(
                        "the block adds one term, {}",
                        shown(&self.nodes[*t])
                    )),
                }
            }
            [] if !found_input => {
                Err("no residual path from the block's input to its output".into())
            }
            _ => Err(format!(
                "the block adds {} term(s) to the residual stream ({})",
                terms.len(),
                describe()
            )),
        };
        // The matrix product reading block `block`'s weight `weight` (exactly one), and its input.
        let product_input = |exact: &str, moe: Option<&str>| -> Result<usize, String> {
            let mut hits = Vec::new();
            for i in self.span_nodes(block, out) {
                let n = &self.nodes[i];
                let Some(Some(w)) = n.leafs.first() else {
                    continue;
                };
                if n.op == sys::GGML_OP_MUL_MAT && w.as_slice() == exact.as_bytes() {
                    hits.push(i);
                } else if moe.is_some_and(|m| w.starts_with(m.as_bytes())) {
                    return Err(
                        "a mixture-of-experts block: per-expert activations are not captured yet"
                            .into(),
                    );
                }
            }
            match hits.as_slice() {
                [i] => self.nodes[*i]
                    .pos_srcs
                    .get(1)
                    .copied()
                    .flatten()
                    .ok_or_else(|| {
                        format!("the input of the product with `{exact}` is not a computed tensor")
                    }),
                [] => Err(format!("no matrix product with `{exact}` in the block")),
                _ => Err(format!(
                    "{} matrix products with `{exact}` in the block",
                    hits.len()
                )),
            }
        };
        let wanted: Vec<usize> = (0..self.taps.len())
            .filter(|&k| self.taps[k].1 == block)
            .collect();
        let mut located = Vec::new();
        for k in wanted {
            let tap = self.taps[k].0;
            let node = match tap {
                Tap::AttnOut => split.as_ref().map(|s| s.0).map_err(|e| e.clone()),
                Tap::MlpOut => split.as_ref().map(|s| s.1).map_err(|e| e.clone()),
                Tap::ResidMid => split
                    .as_ref()
                    .map_err(|e| e.clone())
                    .and_then(|s| s.2.clone()),
                Tap::Z => product_input(&format!("blk.{block}.attn_output.weight"), None),
                Tap::Neurons => product_input(
                    &format!("blk.{block}.ffn_down.weight"),
                    Some(&format!("blk.{block}.ffn_down_exps")),
                ),
                Tap::Pattern => {
                    // The softmax over keys: the one whose scores read this block's K cache.
                    let cache = format!("cache_k_l{block}");
                    let hits: Vec<usize> = self
                        .span_nodes(block, out)
                        .filter(|&i| self.nodes[i].op == sys::GGML_OP_SOFT_MAX)
                        .filter(|&i| self.scores_read(i, cache.as_bytes()))
                        .collect();
                    match hits.as_slice() {
                        [i] => Ok(*i),
                        [] if self.span_nodes(block, out).any(|i| self.nodes[i].op == sys::GGML_OP_FLASH_ATTN_EXT) => {
                            Err("llama.cpp computed this block's attention with flash attention, which keeps no probabilities".into())
                        }
                        [] => Err(format!("no softmax over scores read from `{cache}` in the block")),
                        _ => Err(format!("{} softmaxes over scores read from `{cache}` in the block", hits.len())),
                    }
                }
                Tap::RouterLogits | Tap::RouterExperts | Tap::RouterWeights => {
                    self.router_node(block, out, tap)
                }
                Tap::Resid | Tap::Router => Err("not a tap inside the block".into()),
            }
            .map_err(|why| fail(tap, why))?;
            let n = &self.nodes[node];
            if n.at.0 != block {
                return Err(fail(
                    tap,
                    format!("{} lies outside the block's span of the graph", shown(n)),
                ));
            }
            let pattern = tap == Tap::Pattern;
            let flat = tap == Tap::RouterWeights;
            if flat && n.ne0 != 1 {
                return Err(fail(
                    tap,
                    format!("{} is not one weight per chosen expert", shown(n)),
                ));
            }
            located.push((
                k,
                Locator {
                    block,
                    name: n.name.clone(),
                    occurrence: n.at.1,
                    op: n.op,
                    width: if pattern {
                        0
                    } else if flat {
                        n.ne1
                    } else {
                        n.ne0
                    },
                    heads: if pattern { n.ne2 } else { 1 },
                    out_rows: n.out_rows,
                    sinks: pattern && n.sinks,
                    flat,
                    int: tap.integer(),
                },
            ));
        }
        for (k, l) in located {
            self.found[k] = Some(l);
        }
        Ok(())
    }
}

impl CaptureState {
    /// Record a node of the first graph for the structural check (ask phase).
    ///
    /// # Safety
    /// `t` is a live graph node handed to the eval callback; its non-null `src` entries point to
    /// live tensors.
    unsafe fn observe(&mut self, t: &sys::ggml_tensor, name: &[u8]) {
        let Some(check) = self.check.as_mut() else {
            return;
        };
        let srcs: Vec<(usize, Vec<u8>)> = t
            .src
            .iter()
            .filter(|p| !p.is_null())
            .map(|&p| {
                // SAFETY: a non-null src of a live node is a live tensor.
                let src = unsafe { &*p };
                (p as usize, tensor_name(src).into_bytes())
            })
            .collect();
        let ptr = t as *const sys::ggml_tensor as usize;
        let ne = (
            t.ne[0].max(0) as usize,
            t.ne[1].max(0) as usize,
            t.ne[2].max(0) as usize,
        );
        let sinks = t.op == sys::GGML_OP_SOFT_MAX && !t.src[2].is_null();
        match check.add(ptr, name, t.op, ne, &srcs, sinks) {
            Ok(None) => {}
            Ok(Some(block)) => {
                self.blocks_checked = self.blocks_checked.max(block + 1);
                if block + 1 == check.n_layer {
                    self.last_out_rows = check.nodes.last().is_none_or(|n| n.out_rows);
                    let found = std::mem::take(&mut check.found);
                    self.check = None;
                    self.locators.clear();
                    for (k, f) in found.into_iter().enumerate() {
                        match f {
                            Some(l) => self.locators.push(l),
                            None => {
                                let (tap, b) = self.tap_slots[k];
                                self.fail(format!("tap `{tap}` at block {b} was not identified in llama.cpp's graph"));
                                return;
                            }
                        }
                    }
                    self.counts = vec![0; self.locators.len()];
                }
            }
            Err(e) => {
                self.fail(e);
                self.check = None;
            }
        }
    }
}

impl CaptureState {
    /// Whether node `t` (ask phase, a graph after the checked one) is a tap's tensor: its slot.
    /// Blocks are tracked as the check tracked them ([`Span`]); a node at a locator's place
    /// computed by another op fails the capture.
    fn match_tap(&mut self, t: &sys::ggml_tensor, name: &[u8]) -> Option<usize> {
        let mut hit = None;
        for (k, loc) in self.locators.iter().enumerate() {
            if loc.block == self.cur_block && loc.name == name {
                if self.counts[k] == loc.occurrence {
                    hit = Some(k);
                }
                self.counts[k] += 1;
            }
        }
        if let Some(b) = span_event(name, &self.point0) {
            self.cur_block = b;
            self.counts.iter_mut().for_each(|c| *c = 0);
        }
        let k = hit?;
        if t.op != self.locators[k].op {
            let (tap, b) = self.tap_slots[k];
            self.fail(format!(
                "tap `{tap}` at block {b}: the graph's node at its place is {}, not {} as in the checked graph",
                super::ggml_op_name(t.op),
                super::ggml_op_name(self.locators[k].op)
            ));
            return None;
        }
        Some(self.n_point_slots + k)
    }
}

unsafe extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    let result = catch_unwind(AssertUnwindSafe(|| {
        super::rpc::progress();
        let raw = t;
        // SAFETY: user_data is the CaptureState leaked by Context::new and freed only after
        // llama_free; llama.cpp calls the callback from the thread inside llama_decode (which holds
        // &mut Context), so no other reference to the state is live. t is a live graph tensor.
        let (state, t) = unsafe { (&mut *(user as *mut CaptureState), &*t) };
        let name: &[u8] =
            // SAFETY: the name is a NUL-terminated char array inside the tensor; reinterpreting
            // c_char as u8 keeps length and alignment.
            unsafe { std::slice::from_raw_parts(t.name.as_ptr().cast::<u8>(), t.name.len()) };
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        let point = state.point_for(name);
        let slot = point.and_then(|p| state.slot_of_point[p]);
        let edit = point.filter(|&p| state.edits.get(p).is_some_and(Option::is_some));
        let ptr = raw as usize;
        if ask {
            if state.check.is_some() {
                // SAFETY: ask phase: t is a live node of the graph being computed, and its srcs
                // are live tensors of that graph (nodes, leafs, weights or split copies).
                unsafe { state.observe(t, name) };
            } else if !state.locators.is_empty() {
                if let Some(s) = state.match_tap(t, name) {
                    state.pending.push((ptr, s));
                    return true;
                }
            }
            return slot.is_some() || edit.is_some();
        }
        if let Some(p) = edit {
            // SAFETY: data phase: a computed, live tensor whose consumers have not run yet.
            unsafe { state.edit(raw, p) };
        }
        if let Some(slot) = slot {
            // SAFETY: data phase (ask is false): llama.cpp hands us a computed, live tensor.
            unsafe { state.copy(t, slot) };
        }
        if let Some(k) = state.pending.iter().position(|&(p, _)| p == ptr) {
            let (_, s) = state.pending.swap_remove(k);
            let k = s - state.n_point_slots;
            if state.tap_edits.get(k).is_some_and(Option::is_some) {
                // SAFETY: data phase: the computed tensor a tap's locator matched in the ask
                // phase, whose consumers have not run yet.
                unsafe { state.edit_tap(raw, k) };
            }
            // SAFETY: data phase: the tensor a tap's locator matched in the ask phase, computed.
            unsafe { state.copy(t, s) };
        }
        true
    }));
    match result {
        Ok(v) => v,
        Err(_) => {
            // SAFETY: user_data is the CaptureState leaked by Context::new, live until
            // llama_free; the reference made inside the closure ended with its unwinding, so
            // this is again the only one.
            let state = unsafe { &mut *(user as *mut CaptureState) };
            state.fail("internal error (panic) in the capture callback".into());
            // Data phase: never return false (it would leave stale results); ask phase: don't observe.
            !ask
        }
    }
}

unsafe extern "C" fn abort_callback(_data: *mut c_void) -> bool {
    // Never panics; an atomic load.
    backend::interrupted()
}

/// Element type of llama.cpp's KV cache (`type_k` and `type_v`). llama.cpp's default is F16,
/// which rounds every key and value: states after the first attention differ from an exact
/// computation by ~5e-4 – 2e-3 relative (the architecture matrix's figures). F32 removes that,
/// and turns flash attention off (llama.cpp's flash-attention path casts F32 keys and values to
/// F16); the quantized types need flash attention, which llama.cpp turns on by itself where the
/// backend has it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[clap(rename_all = "lowercase")]
pub enum CacheType {
    F32,
    #[default]
    F16,
    Bf16,
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    #[value(name = "q5_1")]
    #[serde(rename = "q5_1")]
    Q5_1,
    #[value(name = "q5_0")]
    #[serde(rename = "q5_0")]
    Q5_0,
    #[value(name = "q4_1")]
    #[serde(rename = "q4_1")]
    Q4_1,
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
    #[value(name = "iq4_nl")]
    #[serde(rename = "iq4_nl")]
    Iq4Nl,
}

impl CacheType {
    fn ggml(self) -> sys::ggml_type {
        match self {
            CacheType::F32 => sys::GGML_TYPE_F32,
            CacheType::F16 => sys::GGML_TYPE_F16,
            CacheType::Bf16 => sys::GGML_TYPE_BF16,
            CacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
            CacheType::Q5_1 => sys::GGML_TYPE_Q5_1,
            CacheType::Q5_0 => sys::GGML_TYPE_Q5_0,
            CacheType::Q4_1 => sys::GGML_TYPE_Q4_1,
            CacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
            CacheType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
        }
    }
}

/// Most tokens one batch or context may hold: the sizes cross into llama.cpp as 32-bit ints and
/// are allocated at once (`llama_batch_init`), so they are bounded here, before C sees them.
pub const MAX_TOKENS: usize = 1 << 30;

/// Parameters of a context. Sizes are checked against [`MAX_TOKENS`] by [`Context::new`], and
/// llama.cpp's own adjustments are refused there (what a caller asks for is what ran).
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// Total KV cache size in tokens (for all sequences together).
    pub n_ctx: usize,
    /// Largest batch passed to one decode.
    pub n_batch: usize,
    /// Physical micro-batch size (at most `n_batch`).
    pub n_ubatch: usize,
    /// Number of sequences decoded together.
    pub n_seq_max: usize,
    /// Most outputs (tokens with logits) one decode may ask for; 0 = `n_batch`. llama.cpp sizes
    /// its compute and output buffers for this many vocabulary-wide rows of logits, so a tracer
    /// that asks only for last tokens saves n_batch × n_vocab × 4 bytes twice (311 MB each for a
    /// 512-token batch of a 151,936-token vocabulary). Must be ≥ n_seq_max.
    pub n_outputs_max: usize,
    pub n_threads: i32,
    /// Embeddings mode (pooling none): `embeddings_ith` returns the normed last hidden state.
    pub embeddings: bool,
    pub capture: Option<CaptureSpec>,
    /// Element type of the KV cache.
    pub cache_type: CacheType,
    /// Compute attention without flash attention (which keeps no attention probabilities).
    pub no_flash_attn: bool,
}

/// A llama.cpp context borrowing its model. Freed on drop, before its capture state and its
/// threadpool.
pub struct Context<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m Model,
    /// The callback's state (from `Box::into_raw`), owned by this context.
    capture: Option<NonNull<CaptureState>>,
    /// Output flags of the batch of the last successful decode: which indices have logits.
    outputs: Vec<bool>,
    /// Most outputs one decode may ask for (llama.cpp's n_outputs_max, at least n_seq_max).
    n_outputs_max: usize,
    /// What the capture state was made for (to check a graph again: [`Context::recheck`]).
    spec: Option<CaptureSpec>,
    /// The CPU backend's worker threads, kept for the context's life (see [`Context::new`]).
    threadpool: Option<NonNull<sys::ggml_threadpool>>,
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr came from llama_init_from_model and is freed once. After llama_free no
        // callback can run, so the capture state (from Box::into_raw in `new`, freed nowhere
        // else) is reclaimed exactly once, and no graph runs on the threadpool (from
        // ggml_threadpool_new in `new`, attached to this context only), freed once after it.
        unsafe {
            sys::llama_free(self.ptr.as_ptr());
            if let Some(st) = self.capture.take() {
                drop(Box::from_raw(st.as_ptr()));
            }
            if let Some(tp) = self.threadpool.take() {
                sys::ggml_threadpool_free(tp.as_ptr());
            }
        }
    }
}

impl<'m> Context<'m> {
    pub fn new(model: &'m Model, p: ContextParams) -> Result<Context<'m>, ContextError> {
        let capture = p.capture.as_ref().map(|spec| {
            let mut slot_of_point = vec![None; spec.n_layer + 1];
            for (slot, &pt) in spec.points.iter().enumerate() {
                slot_of_point[pt] = Some(slot);
            }
            let last_slot = slot_of_point.last().copied().flatten();
            Box::new(CaptureState {
                point0: spec.point0_name.as_bytes().to_vec(),
                slot_of_point,
                n_embd: spec.n_embd,
                rows: vec![Vec::new(); spec.points.len() + spec.tap_slots().len()],
                seen: vec![0; spec.points.len() + spec.tap_slots().len()],
                wanted: Vec::new(),
                wanted_out: Vec::new(),
                last_slot,
                last_out_rows: true,
                out_index: Vec::new(),
                last_tokens: [0; 2],
                bytes_read: 0,
                error: None,
                check: Some(GraphCheck::new(spec)),
                blocks_checked: 0,
                edits: vec![None; spec.n_layer + 1],
                rows_edited: vec![0; spec.n_layer + 1],
                tap_edits: vec![None; spec.tap_slots().len()],
                tap_rows_edited: vec![0; spec.tap_slots().len()],
                n_point_slots: spec.points.len(),
                tap_slots: spec.tap_slots(),
                locators: Vec::new(),
                cur_block: 0,
                counts: Vec::new(),
                pending: Vec::new(),
                row_lens: vec![Vec::new(); spec.tap_slots().len()],
            })
        });
        // From here the state is reached only through this pointer (see CaptureState).
        let capture = capture.map(|b| NonNull::from(Box::leak(b)));
        let free_capture = |c: Option<NonNull<CaptureState>>| {
            if let Some(st) = c {
                // SAFETY: from Box::leak above, not yet shared with llama.cpp (no context).
                drop(unsafe { Box::from_raw(st.as_ptr()) });
            }
        };
        for (what, v) in [
            ("context size", p.n_ctx),
            ("batch size", p.n_batch),
            ("micro-batch size", p.n_ubatch),
            ("sequence count", p.n_seq_max),
            ("output count", p.n_outputs_max),
        ] {
            if v > MAX_TOKENS {
                free_capture(capture);
                return Err(ContextError::Create(Some(format!(
                    "the {what} {v} is more than llama.cpp can be given ({MAX_TOKENS})"
                ))));
            }
        }
        if p.n_ubatch > p.n_batch || p.n_batch > p.n_ctx || p.n_seq_max == 0 || p.n_ubatch == 0 {
            free_capture(capture);
            return Err(ContextError::Create(Some(format!(
                "sizes that llama.cpp would change: micro-batch {} ≤ batch {} ≤ context {} and at least one sequence are needed",
                p.n_ubatch, p.n_batch, p.n_ctx
            ))));
        }
        // SAFETY: returns a plain struct of defaults.
        let mut cp = unsafe { sys::llama_context_default_params() };
        // Each value is at most MAX_TOKENS (checked above), so it fits u32.
        cp.n_ctx = p.n_ctx as u32;
        cp.n_batch = p.n_batch as u32;
        cp.n_ubatch = p.n_ubatch as u32;
        cp.n_seq_max = p.n_seq_max as u32;
        if p.n_outputs_max > 0 {
            // llama.cpp reserves n_seq_max outputs at creation and asserts they fit.
            let v = p.n_outputs_max.max(p.n_seq_max);
            if v > p.n_batch {
                free_capture(capture);
                return Err(ContextError::Create(Some(format!(
                    "{} sequences need at least {v} outputs, more than the batch size {}",
                    p.n_seq_max, p.n_batch
                ))));
            }
            cp.n_outputs_max = v as u32;
        }
        cp.n_threads = p.n_threads;
        cp.n_threads_batch = p.n_threads;
        // Several sequences per batch: a unified KV cache keeps ubatches contiguous in batch order
        // (otherwise llama.cpp's split_equal reorders rows and the callback cannot see the layout).
        cp.kv_unified = true;
        cp.embeddings = p.embeddings;
        if p.embeddings {
            cp.pooling_type = sys::LLAMA_POOLING_TYPE_NONE;
        }
        cp.no_perf = true;
        cp.type_k = p.cache_type.ggml();
        cp.type_v = p.cache_type.ggml();
        if p.cache_type == CacheType::F32 || p.no_flash_attn {
            // llama.cpp's flash-attention path casts F32 keys and values to F16 before attending,
            // so an F32 cache is exact only on the classic attention path.
            cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_DISABLED;
        }
        if let Some(state) = capture {
            cp.cb_eval = Some(eval_callback);
            cp.cb_eval_user_data = state.as_ptr().cast();
        }
        cp.abort_callback = Some(abort_callback);
        cp.abort_callback_data = std::ptr::null_mut();
        backend::clear_log();
        let ptr = {
            let _watch = super::rpc::arm();
            // SAFETY: the model outlives the context (borrow 'm); cb_eval_user_data is the leaked
            // capture state that this Context frees after llama_free.
            unsafe { sys::llama_init_from_model(model.as_ptr(), cp) }
        };
        let Some(ptr) = NonNull::new(ptr) else {
            free_capture(capture);
            return Err(ContextError::Create(backend::last_error_line()));
        };
        // SAFETY: ptr is the context just created.
        let used = unsafe {
            (
                sys::llama_n_batch(ptr.as_ptr()),
                sys::llama_n_ubatch(ptr.as_ptr()),
            )
        };
        if used != (cp.n_batch, cp.n_ubatch) {
            // What run.json records must be what ran.
            // SAFETY: ptr was created above and is not used after this.
            unsafe { sys::llama_free(ptr.as_ptr()) };
            free_capture(capture);
            return Err(ContextError::Create(Some(format!(
                "llama.cpp chose batch {} and micro-batch {} instead of {} and {}",
                used.0, used.1, cp.n_batch, cp.n_ubatch
            ))));
        }
        let n_outputs_max = if cp.n_outputs_max > 0 {
            cp.n_outputs_max
        } else {
            used.0
        } as usize;
        // Without a threadpool, ggml's CPU backend starts and joins its worker threads for every
        // graph it computes — and the eval callback splits each decode into one graph per
        // captured tensor (29 per token for a 28-block model). Worker threads that live as long
        // as the context (as llama.cpp's own tools attach) make a split cost a wake-up instead:
        // traced generation went from 1.10–1.14× untraced to 0.99–1.07× (Qwen2.5-1.5B and
        // SmolLM2, one prompt at a time, measured with and without the pool).
        // The work is divided among the same number of threads either way: the results are the
        // same bits. (ggml aborts where it cannot start a thread, with or without the pool.)
        let threadpool = if p.n_threads >= 1 {
            // SAFETY: returns a plain struct of defaults for n_threads threads.
            let mut tpp = unsafe { sys::ggml_threadpool_params_default(p.n_threads) };
            // Workers sleep between graphs rather than spin (ggml's default polls for a while):
            // a spinning worker takes a core from the work done between decodes — a served
            // token with the logit lens at 31 points took 69 ms beside one, 52 ms without
            // (SmolLM2, 2 cores), while traced generation was 1.00× and 1.02× untraced with and
            // without the spin, within noise.
            tpp.poll = 0;
            // SAFETY: tpp is a valid parameter struct that outlives the call; the result is a new
            // threadpool or null.
            NonNull::new(unsafe { sys::ggml_threadpool_new(&mut tpp) })
        } else {
            None
        };
        if let Some(tp) = threadpool {
            // SAFETY: ptr is the context created above and tp a live threadpool of p.n_threads
            // threads (the context's n_threads and n_threads_batch); Drop frees the context
            // before the pool, so no graph runs on a freed pool.
            unsafe { sys::llama_attach_threadpool(ptr.as_ptr(), tp.as_ptr(), tp.as_ptr()) };
        }
        Ok(Context {
            ptr,
            model,
            capture,
            outputs: Vec::new(),
            n_outputs_max,
            spec: p.capture.clone(),
            threadpool,
        })
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Decode a batch. On success the captured rows of this decode are available through
    /// [`Context::captured`].
    pub fn decode(&mut self, batch: &Batch) -> Result<(), ContextError> {
        super::backend::failpoint_ggml_abort();
        self.outputs.clear();
        if let Some(st) = self.state_mut() {
            st.rows.iter_mut().for_each(Vec::clear);
            st.seen.iter_mut().for_each(|n| *n = 0);
            st.rows_edited.iter_mut().for_each(|n| *n = 0);
            st.tap_rows_edited.iter_mut().for_each(|n| *n = 0);
            st.last_tokens = [0; 2];
            st.error = None;
            st.cur_block = 0;
            st.counts.iter_mut().for_each(|c| *c = 0);
            st.pending.clear();
            st.row_lens.iter_mut().for_each(Vec::clear);
            if let Some(check) = st.check.as_mut() {
                // Whatever an interrupted decode recorded belonged to its own graph.
                check.reset();
            }
        }
        if backend::interrupted() {
            return Err(ContextError::Interrupted);
        }
        // llama.cpp asserts (an abort, not an error) when a batch has more outputs than the
        // context was sized for: refuse it here instead.
        let outputs: Vec<bool> = (0..batch.len()).map(|i| batch.is_output(i)).collect();
        let n_out = outputs.iter().filter(|&&o| o).count();
        if n_out > self.n_outputs_max {
            return Err(ContextError::TooManyOutputs {
                got: n_out,
                max: self.n_outputs_max,
            });
        }
        if let Some(st) = self.state_mut() {
            st.out_index.clear();
            let mut k = 0;
            st.out_index.extend(outputs.iter().map(|&o| {
                o.then(|| {
                    k += 1;
                    k - 1
                })
            }));
        }
        let rc = {
            let _watch = super::rpc::arm();
            // SAFETY: the context is valid; the batch's arrays hold batch.len() initialised
            // entries (Batch maintains that invariant) and stay alive during the call.
            unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) }
        };
        match rc {
            0 => {}
            1 => return Err(ContextError::NoKvSlot),
            2 => return Err(ContextError::Interrupted),
            _ if backend::interrupted() => return Err(ContextError::Interrupted),
            rc => {
                return Err(ContextError::Decode {
                    code: rc,
                    reason: backend::last_error_line(),
                })
            }
        }
        if let Some(st) = self.state_mut() {
            // The check covers the first graph only; one still open saw no output of some block.
            if let Some(check) = st.check.take() {
                st.fail(check.missing_block());
            }
        }
        if let Some(err) = self.state().and_then(|s| s.error.clone()) {
            return Err(ContextError::Capture(err));
        }
        self.outputs = outputs;
        Ok(())
    }

    fn state(&self) -> Option<&CaptureState> {
        // SAFETY: the state lives until Drop; the callback only touches it inside llama_decode,
        // which needs &mut self, so no mutable access overlaps this shared borrow.
        self.capture.map(|p| unsafe { &*p.as_ptr() })
    }

    fn state_mut(&mut self) -> Option<&mut CaptureState> {
        // SAFETY: as in `state`; &mut self excludes every other borrow of the state.
        self.capture.map(|p| unsafe { &mut *p.as_ptr() })
    }

    /// Rows captured by the last decode, per kept point (row-major, n_embd floats per row): the
    /// wanted rows only (see [`Context::set_wanted_rows`]), in batch order.
    pub fn captured(&self) -> Option<&[Vec<f32>]> {
        self.state().map(|s| s.rows.as_slice())
    }

    /// Rows each kept point's tensor delivered in the last decode (wanted or not): n_tokens, or
    /// the number of outputs for the last block.
    pub fn rows_seen(&self) -> Option<&[usize]> {
        self.state().map(|s| s.seen.as_slice())
    }

    /// Choose the rows the next decodes copy: `tokens[i]` for batch token i (every point but the
    /// last block), `outputs[k]` for the k-th output (the last block). Empty slices: every row.
    pub fn set_wanted_rows(&mut self, tokens: &[bool], outputs: &[bool]) {
        if let Some(st) = self.state_mut() {
            st.wanted.clear();
            st.wanted.extend_from_slice(tokens);
            st.wanted_out.clear();
            st.wanted_out.extend_from_slice(outputs);
        }
    }

    /// Check the next decode's graph again (structure and taps), as for the first: after a
    /// change that changes the graph's shape (a control vector adds nodes). Taps are captured
    /// only from the graph after a checked one.
    pub fn recheck(&mut self) {
        let Some(spec) = self.spec.clone() else {
            return;
        };
        if let Some(st) = self.state_mut() {
            st.check = Some(GraphCheck::new(&spec));
            st.blocks_checked = 0;
            st.locators.clear();
            st.counts.clear();
        }
    }

    /// Per tap slot (see [`CaptureSpec::taps`]): values per row, and whether it holds one row per
    /// output (after the last block's output-row selection) instead of one per token. Empty until
    /// a checked graph identified the taps.
    pub fn tap_layout(&self) -> Vec<(usize, bool)> {
        self.state()
            .map(|s| s.locators.iter().map(|l| (l.width, l.out_rows)).collect())
            .unwrap_or_default()
    }

    /// Per tap slot: the length of every row the last decode copied, for taps whose rows vary
    /// (`pattern`: heads × KV cells in use); empty for the others.
    pub fn tap_row_lens(&self) -> Option<&[Vec<usize>]> {
        self.state().map(|s| s.row_lens.as_slice())
    }

    /// Per tap slot: the heads of `pattern` (1 for other taps).
    pub fn tap_heads(&self) -> Vec<usize> {
        self.state()
            .map(|s| s.locators.iter().map(|l| l.heads).collect())
            .unwrap_or_default()
    }

    /// Per tap slot: whether its softmax has attention sinks (`pattern` rows then sum below 1).
    pub fn tap_sinks(&self) -> Vec<bool> {
        self.state()
            .map(|s| s.locators.iter().map(|l| l.sinks).collect())
            .unwrap_or_default()
    }

    /// Per tap slot: llama.cpp's name of the tensor identified (for run.json).
    pub fn tap_tensors(&self) -> Vec<String> {
        self.state()
            .map(|s| {
                s.locators
                    .iter()
                    .map(|l| String::from_utf8_lossy(&l.name).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Blocks (0..n) whose input and output tensors the structural graph check confirmed: equal
    /// to n_layer after the first successful decode.
    pub fn blocks_checked(&self) -> usize {
        self.state().map_or(0, |s| s.blocks_checked)
    }

    /// Interventions for the next decodes: `edits[p]` is written into point p (0..=n_layer) at
    /// every row; `None` leaves a point as computed. Only on capture contexts.
    pub fn set_edits(&mut self, edits: Vec<Option<Edit>>) {
        if let Some(st) = self.state_mut() {
            let n = st.edits.len();
            st.edits = edits;
            st.edits.resize(n, None);
        }
    }

    /// Rows the last decode wrote back, per point (0..=n_layer).
    pub fn rows_edited(&self) -> Option<&[usize]> {
        self.state().map(|s| s.rows_edited.as_slice())
    }

    /// Interventions inside blocks for the next decodes: `edits[k]` is written into tap slot k
    /// (see [`CaptureSpec::taps`]) at every row of its tensor, after the tensor is computed and
    /// before any op reads it. Only on capture contexts; taps are matched from the graph after
    /// a checked one.
    pub fn set_tap_edits(&mut self, edits: Vec<Option<Edit>>) {
        if let Some(st) = self.state_mut() {
            let n = st.tap_edits.len();
            st.tap_edits = edits;
            st.tap_edits.resize(n, None);
        }
    }

    /// Rows the last decode wrote back, per tap slot.
    pub fn tap_rows_edited(&self) -> Option<&[usize]> {
        self.state().map(|s| s.tap_rows_edited.as_slice())
    }

    /// Bytes copied from backend tensors since this context was created.
    pub fn bytes_read(&self) -> u64 {
        self.state().map_or(0, |s| s.bytes_read)
    }

    /// Whether batch index `i` of the last successful decode was an output (has logits).
    fn has_output(&self, i: usize) -> bool {
        self.outputs.get(i).copied().unwrap_or(false)
    }

    /// Next-token logits of output `i` (a batch index marked as output) of the last decode; None
    /// for any other index (checked here: llama.cpp's own check is an assertion).
    pub fn logits_ith(&self, i: usize) -> Option<&[f32]> {
        if !self.has_output(i) {
            return None;
        }
        // SAFETY: the context is valid and i is an output of the last decode (checked above).
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i as i32) };
        if p.is_null() {
            return None;
        }
        // SAFETY: a non-null result points to n_vocab floats owned by the context, valid until the
        // next decode (which needs &mut self, so the borrow prevents it).
        Some(unsafe { std::slice::from_raw_parts(p, self.model.n_vocab()) })
    }

    /// The normed last hidden state of output `i` in embeddings mode (pooling none).
    pub fn embeddings_ith(&self, i: usize) -> Option<&[f32]> {
        if !self.has_output(i) {
            return None;
        }
        // SAFETY: the context is valid and i is an output of the last decode (checked above);
        // null when embeddings are off.
        let p = unsafe { sys::llama_get_embeddings_ith(self.ptr.as_ptr(), i as i32) };
        if p.is_null() {
            return None;
        }
        // SAFETY: a non-null result points to n_embd floats owned by the context, valid until the
        // next decode.
        Some(unsafe { std::slice::from_raw_parts(p, self.model.n_embd()) })
    }

    /// Hand sequence `seq`'s KV cells to sequence `keeper` (which no decode uses): `seq` is free
    /// for a new prompt, while its cells stay taken, so a newcomer's keys are placed after the
    /// others' rather than in the gap it would leave (see `Tracer::serve`).
    pub fn retire_sequence(&mut self, seq: usize, keeper: usize) {
        let _watch = super::rpc::arm();
        // SAFETY: the context is valid and its memory handle lives as long as it; both ids are
        // below the context's n_seq_max (the caller's slots); copying then removing every
        // position (-1, -1) of a sequence is always allowed on a unified cache.
        unsafe {
            let mem = sys::llama_get_memory(self.ptr.as_ptr());
            sys::llama_memory_seq_cp(mem, seq as i32, keeper as i32, -1, -1);
            sys::llama_memory_seq_rm(mem, seq as i32, -1, -1);
        }
    }

    /// Forget the KV cache of all sequences.
    pub fn clear_memory(&mut self) {
        self.outputs.clear();
        let _watch = super::rpc::arm();
        // SAFETY: the context is valid; its memory handle is valid while the context lives.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) }
    }

    /// Apply a control vector (`data` holds n_embd floats per layer starting at il = 1) to layers
    /// `il_start..=il_end`, or clear it with `None`.
    pub fn set_control_vector(
        &mut self,
        data: Option<&[f32]>,
        il_start: i32,
        il_end: i32,
    ) -> Result<(), ContextError> {
        let n_embd = self.model.n_embd() as i32;
        let (ptr, len) = match data {
            Some(d) => (d.as_ptr(), d.len()),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: the context is valid; data (if any) points to len floats that llama.cpp copies
        // into its own buffer before returning.
        let rc = unsafe {
            sys::llama_set_adapter_cvec(self.ptr.as_ptr(), ptr, len, n_embd, il_start, il_end)
        };
        if rc != 0 {
            return Err(ContextError::ControlVector(rc));
        }
        Ok(())
    }
}

/// A `llama_batch` we own: tokens with positions, one sequence id each, and output flags.
pub struct Batch {
    raw: sys::llama_batch,
    cap: usize,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: raw came from llama_batch_init and is freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

impl Batch {
    /// A batch holding up to `cap` tokens (1 ..= [`MAX_TOKENS`]; more is refused before C sees it).
    pub fn new(cap: usize) -> Result<Batch, ContextError> {
        if cap > MAX_TOKENS {
            return Err(ContextError::Create(Some(format!(
                "a batch of {cap} tokens is more than llama.cpp can be given ({MAX_TOKENS})"
            ))));
        }
        let cap = cap.max(1);
        // SAFETY: allocates arrays for cap ≤ MAX_TOKENS < i32::MAX tokens with room for one
        // sequence id each; llama_batch_init does not check its mallocs, so they are checked here.
        let mut raw = unsafe { sys::llama_batch_init(cap as i32, 0, 1) };
        raw.n_tokens = 0;
        let b = Batch { raw, cap };
        if b.raw.token.is_null()
            || b.raw.pos.is_null()
            || b.raw.n_seq_id.is_null()
            || b.raw.seq_id.is_null()
            || b.raw.logits.is_null()
        {
            return Err(ContextError::Create(Some(format!(
                "out of memory for a batch of {cap} tokens"
            ))));
        }
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Append a token at `pos` of sequence `seq`; `output` asks for its logits (and, for capture,
    /// its row in the last block).
    pub fn push(&mut self, token: Token, pos: usize, seq: usize, output: bool) {
        let i = self.len();
        assert!(i < self.cap, "batch capacity {} exceeded", self.cap);
        // SAFETY: i < cap, and llama_batch_init allocated cap entries in every array (with one
        // seq id slot per token).
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos as i32;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = seq as i32;
            *self.raw.logits.add(i) = output as i8;
        }
        self.raw.n_tokens += 1;
    }

    /// Whether token `i` is marked as output.
    pub fn is_output(&self, i: usize) -> bool {
        assert!(i < self.len());
        // SAFETY: i < n_tokens <= cap.
        unsafe { *self.raw.logits.add(i) != 0 }
    }
}

#[cfg(test)]
mod tests {
    //! The graph self-check on synthetic graphs shaped like llama.cpp's (the architecture matrix
    //! runs it on real graphs; these cover what a CPU-only suite cannot reach: split copies from
    //! GPU/RPC backends, graphs that end early, stale names).

    use super::*;

    /// A graph under construction: nodes get fake addresses in order.
    struct G {
        check: GraphCheck,
        next: usize,
        /// Name → address of the nodes added.
        addr: std::collections::HashMap<String, usize>,
    }

    impl G {
        fn new(point0: &str, n_layer: usize) -> G {
            G {
                check: GraphCheck::new(&CaptureSpec {
                    arch: "test".into(),
                    point0_name: point0.into(),
                    n_layer,
                    n_embd: 4,
                    points: (0..=n_layer).collect(),
                    taps: Vec::new(),
                }),
                next: 0x1000,
                addr: Default::default(),
            }
        }

        /// Add node `name` computed by `op` from `srcs` (names of earlier nodes; a name not added
        /// is a weight or input, `BACKEND#name#0` a split copy).
        fn node(
            &mut self,
            name: &str,
            op: sys::ggml_op,
            srcs: &[&str],
        ) -> Result<Option<usize>, String> {
            let srcs: Vec<(usize, Vec<u8>)> = srcs
                .iter()
                .map(|s| {
                    (
                        self.addr.get(*s).copied().unwrap_or(0xdead_0000 + s.len()),
                        s.as_bytes().to_vec(),
                    )
                })
                .collect();
            self.next += 0x100;
            self.addr.insert(name.into(), self.next);
            self.check
                .add(self.next, name.as_bytes(), op, (4, 1, 1), &srcs, false)
        }

        /// A pre-norm block `il` reading `input`, as llama.cpp's llama graph builds it.
        fn block(&mut self, il: usize, input: &str) -> Result<Option<usize>, String> {
            let n = |s: &str| format!("{s}-{il}");
            self.node("", sys::GGML_OP_RMS_NORM, &[input])?;
            self.node(&n("attn_norm"), sys::GGML_OP_MUL, &["", "w"])?;
            self.node(
                &n("attn_out"),
                sys::GGML_OP_MUL_MAT,
                &["wo", &n("attn_norm")],
            )?;
            self.node(&n("ffn_inp"), sys::GGML_OP_ADD, &[&n("attn_out"), input])?;
            self.node(
                &format!("ffn_rms-{il}"),
                sys::GGML_OP_RMS_NORM,
                &[&n("ffn_inp")],
            )?;
            self.node(
                &n("ffn_out"),
                sys::GGML_OP_MUL_MAT,
                &["w2", &format!("ffn_rms-{il}")],
            )?;
            self.node(
                &n("l_out"),
                sys::GGML_OP_ADD,
                &[&n("ffn_out"), &n("ffn_inp")],
            )
        }
    }

    impl G {
        /// A graph check asking for every identifiable tap at every block.
        fn with_taps(point0: &str, n_layer: usize) -> G {
            let mut g = G::new(point0, n_layer);
            let blocks: Vec<usize> = (0..n_layer).collect();
            g.check = GraphCheck::new(&CaptureSpec {
                arch: "test".into(),
                point0_name: point0.into(),
                n_layer,
                n_embd: 4,
                points: (0..=n_layer).collect(),
                taps: [
                    Tap::ResidMid,
                    Tap::AttnOut,
                    Tap::MlpOut,
                    Tap::Z,
                    Tap::Neurons,
                ]
                .into_iter()
                .map(|t| (t, blocks.clone()))
                .collect(),
            });
            g
        }

        /// A block with GGUF weight names: sequential (llama) or parallel (gpt-neox:
        /// l_out = (ffn + attn) + input).
        fn named_block(
            &mut self,
            il: usize,
            input: &str,
            parallel: bool,
        ) -> Result<Option<usize>, String> {
            let w = |s: &str| format!("blk.{il}.{s}.weight");
            let n = |s: &str| format!("{s}-{il}");
            self.node(&n("attn_norm"), sys::GGML_OP_RMS_NORM, &[input])?;
            self.node(
                &n("kqv_out"),
                sys::GGML_OP_MUL_MAT,
                &[&w("attn_v"), &n("attn_norm")],
            )?;
            self.node(
                "",
                sys::GGML_OP_MUL_MAT,
                &[&w("attn_output"), &n("kqv_out")],
            )?;
            // An unnamed node is named by its index, as ggml does.
            let attn = format!("node_{il}a");
            self.node(&attn, sys::GGML_OP_ADD, &["", "bo"])?;
            let ffn_in = if parallel {
                n("attn_norm")
            } else {
                self.node(&n("ffn_inp"), sys::GGML_OP_ADD, &[&attn, input])?;
                n("ffn_inp")
            };
            self.node(&n("ffn_norm"), sys::GGML_OP_RMS_NORM, &[&ffn_in])?;
            self.node(
                &n("ffn_act"),
                sys::GGML_OP_MUL_MAT,
                &[&w("ffn_up"), &n("ffn_norm")],
            )?;
            self.node(
                &n("ffn_out"),
                sys::GGML_OP_MUL_MAT,
                &[&w("ffn_down"), &n("ffn_act")],
            )?;
            if parallel {
                self.node(&n("par"), sys::GGML_OP_ADD, &[&n("ffn_out"), &attn])?;
                self.node(&n("l_out"), sys::GGML_OP_ADD, &[&n("par"), input])
            } else {
                self.node(
                    &n("l_out"),
                    sys::GGML_OP_ADD,
                    &[&n("ffn_out"), &n("ffn_inp")],
                )
            }
        }

        /// The name of the node a tap was located at, per block.
        fn located(&self, tap: Tap) -> Vec<Option<String>> {
            self.check
                .taps
                .iter()
                .zip(&self.check.found)
                .filter(|((t, _), _)| *t == tap)
                .map(|(_, f)| {
                    f.as_ref()
                        .map(|l| String::from_utf8_lossy(&l.name).into_owned())
                })
                .collect()
        }
    }

    #[test]
    fn taps_are_found_by_structure_in_a_sequential_block() {
        let mut g = G::with_taps("embd", 2);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        assert_eq!(g.named_block(0, "embd", false), Ok(Some(0)));
        assert_eq!(g.named_block(1, "l_out-0", false), Ok(Some(1)));
        let some = |v: [&str; 2]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
        assert_eq!(g.located(Tap::AttnOut), some(["node_0a", "node_1a"]));
        assert_eq!(g.located(Tap::ResidMid), some(["ffn_inp-0", "ffn_inp-1"]));
        assert_eq!(g.located(Tap::MlpOut), some(["ffn_out-0", "ffn_out-1"]));
        assert_eq!(g.located(Tap::Z), some(["kqv_out-0", "kqv_out-1"]));
        assert_eq!(g.located(Tap::Neurons), some(["ffn_act-0", "ffn_act-1"]));
    }

    #[test]
    fn a_parallel_block_has_attention_and_mlp_terms_but_no_resid_mid() {
        let mut g = G::with_taps("embd", 1);
        g.check.taps.retain(|(t, _)| *t != Tap::ResidMid);
        g.check.found.truncate(g.check.taps.len());
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        assert_eq!(g.named_block(0, "embd", true), Ok(Some(0)));
        assert_eq!(g.located(Tap::AttnOut), vec![Some("node_0a".to_string())]);
        assert_eq!(g.located(Tap::MlpOut), vec![Some("ffn_out-0".to_string())]);

        let mut g = G::with_taps("embd", 1);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        let e = g.named_block(0, "embd", true).unwrap_err();
        assert!(
            e.contains("tap `resid_mid` cannot be identified at block 0 for architecture `test`: this architecture computes attention and the MLP in parallel"),
            "{e}"
        );
    }

    #[test]
    fn an_l_out_in_the_middle_of_a_block_is_caught_by_the_weights_it_leaves_behind() {
        // `l_out-0` labels block 0's mid-block sum: block 1's span then holds the rest of block
        // 0 (its MLP, reading blk.0 weights) before block 1's own nodes.
        let mut g = G::new("embd", 2);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        g.node("", sys::GGML_OP_RMS_NORM, &["embd"]).unwrap();
        g.node(
            "a0",
            sys::GGML_OP_MUL_MAT,
            &["blk.0.attn_output.weight", ""],
        )
        .unwrap();
        assert_eq!(
            g.node("l_out-0", sys::GGML_OP_ADD, &["a0", "embd"]),
            Ok(Some(0))
        );
        g.node("n0", sys::GGML_OP_RMS_NORM, &["l_out-0"]).unwrap();
        g.node("f0", sys::GGML_OP_MUL_MAT, &["blk.0.ffn_down.weight", "n0"])
            .unwrap();
        g.node("r0", sys::GGML_OP_ADD, &["f0", "l_out-0"]).unwrap();
        g.node("n1", sys::GGML_OP_RMS_NORM, &["r0"]).unwrap();
        g.node(
            "a1",
            sys::GGML_OP_MUL_MAT,
            &["blk.1.attn_output.weight", "n1"],
        )
        .unwrap();
        let e = g
            .node("l_out-1", sys::GGML_OP_ADD, &["a1", "r0"])
            .unwrap_err();
        assert!(
            e.contains("reads block 0's weight `blk.0.ffn_down.weight`"),
            "{e}"
        );
    }

    #[test]
    fn a_llama_graph_checks_out_and_a_wrong_point0_is_named() {
        let mut g = G::new("embd", 2);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        assert_eq!(g.block(0, "embd"), Ok(Some(0)));
        assert_eq!(g.block(1, "l_out-0"), Ok(Some(1)));

        let mut g = G::new("attn_norm-0", 1);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        let e = g.block(0, "embd").unwrap_err();
        assert!(
            e.contains("the input of block 0 is `embd` (GET_ROWS), not `attn_norm-0`"),
            "{e}"
        );
    }

    #[test]
    fn a_position_embedding_added_after_embd_is_found() {
        for (point0, ok) in [("inpL", true), ("embd", false)] {
            let mut g = G::new(point0, 1);
            g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
                .unwrap();
            g.node("pos", sys::GGML_OP_GET_ROWS, &["position_embd", "pos_ids"])
                .unwrap();
            g.node("inpL", sys::GGML_OP_ADD, &["embd", "pos"]).unwrap();
            let r = g.block(0, "inpL");
            assert_eq!(r.is_ok(), ok, "{point0}: {r:?}");
            if let Err(e) = r {
                assert!(e.contains("is `inpL` (ADD), not `embd`"), "{e}");
            }
        }
    }

    #[test]
    fn split_copies_resolve_to_their_nodes() {
        // Block 1 runs on another backend: it reads copies of l_out-0 (CUDA, RPC naming).
        for copy in ["CUDA0#l_out-0#0", "RPC[127.0.0.1:50052]#l_out-0#1"] {
            let mut g = G::new("embd", 2);
            g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
                .unwrap();
            assert_eq!(g.block(0, "embd"), Ok(Some(0)));
            assert_eq!(g.block(1, copy), Ok(Some(1)), "{copy}");
        }
    }

    #[test]
    fn the_last_block_reads_its_input_through_the_output_row_selection() {
        let mut g = G::new("embd", 2);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        assert_eq!(g.block(0, "embd"), Ok(Some(0)));
        g.node("", sys::GGML_OP_RMS_NORM, &["l_out-0"]).unwrap();
        g.node("attn_norm-1", sys::GGML_OP_MUL, &["", "w"]).unwrap();
        g.node("attn_out-1", sys::GGML_OP_MUL_MAT, &["wo", "attn_norm-1"])
            .unwrap();
        g.node(
            "rows_attn",
            sys::GGML_OP_GET_ROWS,
            &["attn_out-1", "inp_out_ids"],
        )
        .unwrap();
        g.node(
            "rows_in",
            sys::GGML_OP_GET_ROWS,
            &["l_out-0", "inp_out_ids"],
        )
        .unwrap();
        g.node("ffn_inp-1", sys::GGML_OP_ADD, &["rows_attn", "rows_in"])
            .unwrap();
        g.node("", sys::GGML_OP_RMS_NORM, &["ffn_inp-1"]).unwrap();
        g.node("ffn_out-1", sys::GGML_OP_MUL_MAT, &["w2", ""])
            .unwrap();
        assert_eq!(
            g.node("l_out-1", sys::GGML_OP_ADD, &["ffn_out-1", "ffn_inp-1"]),
            Ok(Some(1))
        );
    }

    #[test]
    fn an_l_out_that_is_not_the_residual_stream_is_refused() {
        // `l_out-1` names a tensor that does not sum onto block 0's output.
        let mut g = G::new("embd", 2);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        assert_eq!(g.block(0, "embd"), Ok(Some(0)));
        g.node("", sys::GGML_OP_RMS_NORM, &["l_out-0"]).unwrap();
        let e = g
            .node("l_out-1", sys::GGML_OP_MUL_MAT, &["w", ""])
            .unwrap_err();
        assert!(e.contains("residual self-check failed for architecture `test`: in llama.cpp's graph the input of block 1 is"), "{e}");
    }

    #[test]
    fn a_graph_that_restarts_before_every_block_is_refused() {
        let mut g = G::new("embd", 3);
        g.node("embd", sys::GGML_OP_GET_ROWS, &["token_embd", "ids"])
            .unwrap();
        assert_eq!(g.block(0, "embd"), Ok(Some(0)));
        // The next graph reuses an address of the first.
        let first = g.addr["embd"];
        let e = g
            .check
            .add(first, b"embd", sys::GGML_OP_GET_ROWS, (4, 1, 1), &[], false)
            .unwrap_err();
        assert!(e.contains("llama.cpp's graph has no `l_out-1`"), "{e}");
        assert!(g.check.missing_block().contains("no `l_out-1`"));
    }
}
