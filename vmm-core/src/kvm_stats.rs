//! KVM's binary statistics (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst
//! "KVM_GET_STATS_FD"): the per-vCPU exit counters an operator would read
//! from /sys/kernel/debug/kvm, without debugfs. The parser works on bytes so
//! it is tested anywhere; opening the fd is arm64/KVM only.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

/// Reads every counter of a stats fd: name -> value (first item of each).
pub fn read_all(f: &std::fs::File) -> std::io::Result<BTreeMap<String, u64>> {
    let mut hdr = [0u8; 24];
    f.read_exact_at(&mut hdr, 0)?;
    let h = Header::parse(&hdr);
    let desc_len = 16 + h.name_size as usize;
    let mut descs = vec![0u8; desc_len * h.num_desc as usize];
    f.read_exact_at(&mut descs, u64::from(h.desc_offset))?;
    let mut out = BTreeMap::new();
    for d in descs.chunks_exact(desc_len) {
        let (name, offset, size) = parse_desc(d);
        if size == 0 {
            continue;
        }
        let mut v = [0u8; 8];
        f.read_exact_at(&mut v, u64::from(h.data_offset) + u64::from(offset))?;
        out.insert(name, u64::from_le_bytes(v));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    name_size: u32,
    num_desc: u32,
    desc_offset: u32,
    data_offset: u32,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

impl Header {
    fn parse(b: &[u8; 24]) -> Header {
        // flags(0) name_size(4) num_desc(8) id_offset(12) desc_offset(16) data_offset(20)
        Header {
            name_size: u32_at(b, 4),
            num_desc: u32_at(b, 8),
            desc_offset: u32_at(b, 16),
            data_offset: u32_at(b, 20),
        }
    }
}

/// (name, data offset, item count) of one descriptor:
/// flags u32, exponent i16, size u16, offset u32, bucket_size u32, name.
fn parse_desc(d: &[u8]) -> (String, u32, u16) {
    let size = u16::from_le_bytes([d[6], d[7]]);
    let offset = u32_at(d, 8);
    let name = &d[16..];
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    (String::from_utf8_lossy(&name[..end]).into_owned(), offset, size)
}

/// Opens a vCPU's (or VM's) stats fd.
#[cfg(target_arch = "aarch64")]
pub fn open(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // _IO(KVMIO, 0xce)
    const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
    // SAFETY: an ioctl without arguments on a KVM fd we own; it returns a new fd.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(unsafe { std::fs::File::from_raw_fd(r) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stats_file_in_kvm_layout_parses() {
        // header, id, two descriptors (name_size 16), data
        let name_size = 16u32;
        let desc_off = 24 + 16;
        let data_off = desc_off + 2 * (16 + name_size);
        let mut f = Vec::new();
        for v in [0, name_size, 2, 24, desc_off, data_off] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&[b'x'; 16]);
        for (name, off) in [("exits", 0u32), ("wfi_exit_stat", 8)] {
            f.extend_from_slice(&0u32.to_le_bytes()); // flags
            f.extend_from_slice(&0i16.to_le_bytes()); // exponent
            f.extend_from_slice(&1u16.to_le_bytes()); // size
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes()); // bucket
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size as usize, 0);
            f.extend_from_slice(&n);
        }
        f.extend_from_slice(&1234u64.to_le_bytes());
        f.extend_from_slice(&56u64.to_le_bytes());
        let t = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(t.path(), &f).expect("write");
        let m = read_all(t.as_file()).expect("parse");
        assert_eq!(m["exits"], 1234);
        assert_eq!(m["wfi_exit_stat"], 56);
    }
}
