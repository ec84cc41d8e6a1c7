//! Reading a BPF hash map that the programs keep changing, with `BPF_MAP_LOOKUP_BATCH`.
//!
//! A walk by "next key" restarts from the first bucket when the key it stands on is deleted
//! meanwhile, so under concurrent frees it counts entries twice (and can skip some). A batch
//! lookup walks the table bucket by bucket instead, copying each bucket under its lock, and
//! its cursor is the bucket index: every entry present for the whole walk is returned exactly
//! once, whatever is inserted or deleted around it. Entries inserted or deleted during the
//! walk may or may not appear. aya 0.14 does not wrap the command, so this uses bpf(2).
use std::{io, mem::size_of, os::fd::RawFd};

use aya::Pod;

/// `enum bpf_cmd` value (include/uapi/linux/bpf.h).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call. A bucket never spans two calls, so one bucket holding more
/// entries than this makes the kernel answer ENOSPC; the buffer then grows.
const FIRST_BATCH: usize = 4096;

/// `struct { ... } batch` of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `each` with every entry of the hash map `fd` (keys `K`, values `V`).
pub fn for_each<K: Pod + Default, V: Pod + Default>(
    fd: RawFd,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut capacity = FIRST_BATCH;
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The cursor (a bucket index for hash maps); 8 bytes leave room for any kernel's token.
    let mut cursor = [0u64; 1];
    let mut next = [0u64; 1];
    let mut first = true;
    loop {
        keys.resize_with(capacity, K::default);
        values.resize_with(capacity, V::default);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { cursor.as_mut_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: capacity as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: attr points at buffers of `count` keys and values of the map's sizes (the
        // caller's K and V), and at 8-byte cursors, all alive across the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let err = (ret < 0).then(io::Error::last_os_error);
        match err.as_ref().and_then(io::Error::raw_os_error) {
            Some(libc::ENOSPC) => {
                // A bucket larger than the buffer: nothing was returned; ask again, larger.
                capacity *= 2;
                continue;
            }
            Some(libc::ENOENT) | None => {}
            Some(_) => return Err(err.expect("an error")),
        }
        let got = (attr.count as usize).min(capacity);
        for (k, v) in keys[..got].iter().zip(&values[..got]) {
            each(k, v);
        }
        if err.is_some() {
            // ENOENT: the walk is over (its last entries, if any, are above).
            return Ok(());
        }
        cursor = next;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_matches_the_kernels_batch_layout() {
        // in_batch, out_batch, keys, values: 8 each; count, map_fd: 4 each; two u64 flags.
        assert_eq!(size_of::<BatchAttr>(), 56);
    }
}
