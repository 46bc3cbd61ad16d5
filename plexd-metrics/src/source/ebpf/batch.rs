//! Reading a whole map in a few system calls (`BPF_MAP_LOOKUP_BATCH`).
//!
//! Written by hand because aya 0.14 offers only per-key lookups: two system calls per entry
//! (next key, then value), which for 10,000 peers and their sessions costs more than the
//! agent's whole collect budget. The batch command (Linux 5.6) copies thousands of entries
//! per call, under each value's spin lock when asked (`BPF_F_LOCK`). Callers fall back to
//! aya's iteration when the kernel does not know the command.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;
use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's internal "not supported" code, which BPF commands can return as is.
const ENOTSUPP: i32 = 524;
/// Entries asked for per call at most; the kernel may return fewer.
const CHUNK: usize = 4096;
/// Bytes of values asked for per call at most, so that reading an array of large values
/// (the session slots) does not take a buffer the size of the map.
const CHUNK_BYTES: usize = 256 * 1024;

/// The `batch` member of `union bpf_attr`.
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

/// The buffers the kernel copies keys and values into, kept from one read to the next: a
/// read of 10,000 peers fills about a megabyte of them, and fresh buffers each time would
/// cost a page fault per page touched on top of the copy.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    keys: Vec<u8>,
    /// Words rather than bytes: values lie at multiples of their size (per-CPU ones at
    /// multiples of 8), so in a word-aligned buffer they can be lent out where they lie.
    values: Vec<u64>,
}

/// Calls `f` with every entry of a map: each key with its value, or with one value per
/// possible CPU when `per_cpu` (which is how the kernel lays out per-CPU values); a chunk of
/// entries in `scratch` at a time.
///
/// `Err` with `ErrorKind::Unsupported` when the kernel lacks the command.
pub(super) fn for_each<K: Pod, V: Pod>(
    map: &MapData,
    per_cpu: bool,
    cpus: usize,
    elem_flags: u64,
    scratch: &mut Scratch,
    mut f: impl FnMut(K, &[V]),
) -> io::Result<()> {
    let key_size = std::mem::size_of::<K>();
    // Per-CPU values are padded to 8 bytes each.
    let (values_per_key, value_stride) = if per_cpu {
        (cpus, std::mem::size_of::<V>().next_multiple_of(8))
    } else {
        (1, std::mem::size_of::<V>())
    };
    let value_size = value_stride * values_per_key;
    let chunk = (CHUNK_BYTES / value_size).clamp(1, CHUNK);
    // Only the entries the kernel reports are read back, so stale bytes beyond them do no
    // harm and the buffers are not cleared.
    let Scratch { keys, values } = scratch;
    if keys.len() < key_size * chunk {
        keys.resize(key_size * chunk, 0);
    }
    let value_words = (value_size * chunk).div_ceil(8);
    if values.len() < value_words {
        values.resize(value_words, 0);
    }
    // Values are lent out in place when they lie back to back and aligned (sessions are
    // 512 bytes, and ten thousand copies of them cost more than the rest of their reading);
    // else each is copied out.
    let in_place = value_stride == std::mem::size_of::<V>() && std::mem::align_of::<V>() <= 8;
    let mut entry = Vec::with_capacity(if in_place { 0 } else { values_per_key });
    // The batch token is a hash map's bucket index or an array's last index (u32 both); 8
    // bytes leave room to spare.
    let mut in_batch = [0u8; 8];
    let mut out_batch = [0u8; 8];
    let mut first = true;
    let fd = map.fd().as_fd().as_raw_fd();
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { in_batch.as_ptr() as u64 },
            out_batch: out_batch.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            elem_flags,
            flags: 0,
        };
        // SAFETY: attr points at a valid, initialised struct whose buffers are large enough
        // for `count` keys and values of the sizes the map was created with.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                (&raw mut attr).cast::<libc::c_void>(),
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let done = if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The last chunk (possibly empty) ends with ENOENT.
                Some(libc::ENOENT) => true,
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, e));
                }
                _ => return Err(e),
            }
        } else {
            false
        };
        // SAFETY: the words viewed as their bytes, which have no alignment or validity needs.
        let value_bytes =
            unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), values.len() * 8) };
        for i in 0..attr.count as usize {
            let key_bytes = &keys[i * key_size..(i + 1) * key_size];
            // SAFETY: K is Pod (any bytes are a valid K) and the slice holds size_of::<K>()
            // bytes; read_unaligned because the buffer is a byte buffer.
            let key = unsafe { std::ptr::read_unaligned(key_bytes.as_ptr().cast::<K>()) };
            let slot = &value_bytes[i * value_size..(i + 1) * value_size];
            if in_place {
                // SAFETY: V is Pod, and the slot holds `values_per_key` of them back to
                // back. It starts a multiple of size_of::<V>() (per-CPU: of 8) bytes into a
                // word-aligned buffer, which is aligned for V: its alignment is at most 8
                // and divides its size.
                let values = unsafe {
                    std::slice::from_raw_parts(slot.as_ptr().cast::<V>(), values_per_key)
                };
                f(key, values);
                continue;
            }
            entry.clear();
            entry.extend((0..values_per_key).map(|c| {
                // SAFETY: as for the key; each value lies within this entry's slot.
                unsafe { std::ptr::read_unaligned(slot[c * value_stride..].as_ptr().cast::<V>()) }
            }));
            f(key, &entry);
        }
        if done {
            return Ok(());
        }
        in_batch = out_batch;
        first = false;
    }
}
