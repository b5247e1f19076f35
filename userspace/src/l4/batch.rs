//! Batched reads of a BPF hash map: `BPF_MAP_LOOKUP_BATCH`, one system call per few thousand
//! entries instead of two per entry (`get_next_key` + `lookup`), which is what lets the sweep read a full connection table of
//! 262 144 entries in milliseconds.
//!
//! Written by hand because aya 0.14 (the newest aya that builds with this toolchain) has no
//! batch operations; the attribute layout is the kernel's `union bpf_attr` member `batch`
//! (include/uapi/linux/bpf.h), stable since Linux 5.6.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
};

use aya::{maps::MapData, Pod};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per system call.
const BATCH_ENTRIES: usize = 4096;

/// `union bpf_attr`'s `batch` member.
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

fn bpf(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; every pointer in it
    // refers to a live buffer of the size the kernel derives from `count` and the map's key
    // and value sizes.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn raw_fd(map: &MapData) -> u32 {
    map.fd().as_fd().as_raw_fd() as u32
}

/// Every entry of the hash map `map` (keys `K`, values `V`), read in batches. Entries that
/// change during the walk may be seen in either version, or not at all if they are inserted.
pub fn read_all<K: Pod + Default, V: Pod + Default>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut keys = vec![K::default(); BATCH_ENTRIES];
    let mut values = vec![V::default(); BATCH_ENTRIES];
    // The hash map's batch token is a bucket index (u32); room for a u64 costs nothing.
    let mut token = 0u64;
    let mut entries = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u64 as u64
            },
            out_batch: &mut token as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_ENTRIES as u32,
            map_fd: raw_fd(map),
            ..BatchAttr::default()
        };
        first = false;
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let read = attr.count as usize;
        entries.extend(
            keys[..read]
                .iter()
                .copied()
                .zip(values[..read].iter().copied()),
        );
        match result {
            Ok(()) => continue,
            // ENOENT: the walk reached the end (the last batch may still hold entries).
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(error) => return Err(error),
        }
    }
}
