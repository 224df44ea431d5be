//! Checking that replicas really are identical: each rank hashes every parameter, the
//! hashes are all-gathered (a few bytes per parameter), and the first parameter on which
//! ranks disagree is named with the ranks that hold each version. Cheap enough to run
//! every N steps: one pass over the buffer and one tiny collective.

use crate::error::{DistError, Result};
use crate::precision::Working;
use distoptim_collective::Communicator;
use distoptim_optim::Layout;

/// 64-bit FNV-1a over the bit patterns (so -0.0 ≠ 0.0 and NaN payloads count: a replica
/// check must see every difference); 16-bit values are widened exactly first.
fn hash<T: Working>(values: &[T]) -> i64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in values {
        for b in v.to_f32().to_bits().to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h as i64
}

/// Errors unless every rank of `group` (the ranks that should hold identical values,
/// e.g. the dp×cp group) has bit-identical `params`. Collective over `group`.
pub fn verify_replicas<T: Working>(group: &Communicator, layout: &Layout, params: &[T]) -> Result<()> {
    if params.len() != layout.numel() {
        return Err(DistError::Invalid(format!("params has {} elements, the layout has {}", params.len(), layout.numel())));
    }
    let (n, k) = (group.size(), layout.len());
    let mut all = vec![0i64; n * k];
    let me = group.rank();
    for (i, p) in layout.params().iter().enumerate() {
        all[me * k + i] = hash(&params[p.range()]);
    }
    group.all_gather(&mut all)?;
    for (i, p) in layout.params().iter().enumerate() {
        let reference = all[i];
        let differ: Vec<usize> = (0..n).filter(|&r| all[r * k + i] != reference).collect();
        if !differ.is_empty() {
            return Err(DistError::Invalid(format!(
                "replicas differ: parameter '{}' on rank(s) {differ:?} is not the same as on rank 0",
                p.name
            )));
        }
    }
    Ok(())
}
