//! Where the kernel, initrd and device tree go in guest memory, and loading
//! them. The kernel is an arm64 `Image` (Documentation/arm64/booting.rst),
//! placed at RAM_BASE + its text_offset. The header is parsed here rather
//! than with linux-loader, whose arm64 loader only builds on arm64 hosts:
//! this way the placement rules are tested on the build machine too.

use std::path::Path;

use crate::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use super::layout;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("kernel {path} is not an arm64 Image: {why}")]
    Kernel { path: String, why: String },
    #[error("{0}")]
    Placement(String),
    #[error("cannot write {what} into guest memory: {source}")]
    Memory { what: &'static str, source: vm_memory::GuestMemoryError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootImage {
    /// Where the boot vCPU starts.
    pub entry: u64,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
    pub fdt: u64,
}

pub fn load(mem: &GuestRam, mem_size: u64, kernel: &Path, initrd: Option<&Path>) -> Result<BootImage, BootError> {
    // The kernel is read straight into guest memory: one copy of ~30 MB
    // instead of two (a temporary buffer costs as much again, which shows
    // in boot time when the host itself is slow).
    let open =
        |p: &Path| std::fs::File::open(p).map_err(|source| BootError::Open { path: p.display().to_string(), source });
    let mut k = open(kernel)?;
    let len = k.metadata().map_err(|source| BootError::Open { path: kernel.display().to_string(), source })?.len();
    let mut head = [0u8; 64];
    let n = std::io::Read::read(&mut k, &mut head)
        .map_err(|source| BootError::Open { path: kernel.display().to_string(), source })?;
    let hdr =
        ImageHeader::parse(&head[..n]).map_err(|why| BootError::Kernel { path: kernel.display().to_string(), why })?;
    let entry = layout::RAM_BASE + hdr.text_offset;
    // image_size covers the BSS the kernel clears after the file's end.
    let kernel_end = entry + hdr.image_size.max(len);
    let fdt = layout::fdt_addr(mem_size);
    if kernel_end > fdt {
        return Err(BootError::Placement(format!(
            "the kernel ends at {kernel_end:#x}, past the device tree at {fdt:#x}: give the VM more memory"
        )));
    }
    std::io::Seek::rewind(&mut k).map_err(|source| BootError::Open { path: kernel.display().to_string(), source })?;
    mem.read_exact_volatile_from(GuestAddress(entry), &mut k, len as usize)
        .map_err(|source| BootError::Memory { what: "kernel", source })?;
    let initrd = match initrd {
        None => None,
        Some(p) => {
            let mut f = open(p)?;
            let size = f.metadata().map_err(|source| BootError::Open { path: p.display().to_string(), source })?.len();
            let start = fdt.checked_sub(size).map(|s| s & !0xfff).filter(|s| *s >= kernel_end);
            let Some(start) = start else {
                return Err(BootError::Placement(format!(
                    "the initrd ({size} bytes) does not fit between the kernel and the device tree: give the VM more memory"
                )));
            };
            mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
                .map_err(|source| BootError::Memory { what: "initrd", source })?;
            Some((start, start + size))
        }
    };
    Ok(BootImage { entry, kernel_end, initrd, fdt })
}

/// The fields of the 64-byte arm64 Image header Basalt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub text_offset: u64,
    pub image_size: u64,
}

impl ImageHeader {
    pub fn parse(k: &[u8]) -> Result<Self, String> {
        if k.len() < 64 {
            return Err(format!("{} bytes is too short for the 64-byte header", k.len()));
        }
        if &k[56..60] != b"ARM\x64" {
            return Err("no \"ARM\\x64\" magic at byte 56 (a gzip or EFI zboot image must be unpacked first)".into());
        }
        let u64_at =
            |o: usize| u64::from_le_bytes([k[o], k[o + 1], k[o + 2], k[o + 3], k[o + 4], k[o + 5], k[o + 6], k[o + 7]]);
        let (mut text_offset, image_size) = (u64_at(8), u64_at(16));
        // booting.rst: an image_size of 0 marks a pre-3.17 kernel whose
        // text_offset is 0x80000 whatever the field says.
        if image_size == 0 {
            text_offset = 0x80000;
        }
        if text_offset % 4096 != 0 || text_offset > (64 << 20) {
            return Err(format!("text_offset {text_offset:#x} is not a sane page-aligned offset"));
        }
        Ok(ImageHeader { text_offset, image_size })
    }
}

pub fn write_fdt(mem: &GuestRam, at: u64, fdt: &[u8]) -> Result<(), BootError> {
    if fdt.len() as u64 > layout::FDT_MAX_SIZE {
        return Err(BootError::Placement(format!("device tree of {} bytes is over 2 MiB", fdt.len())));
    }
    mem.write_slice(fdt, GuestAddress(at)).map_err(|source| BootError::Memory { what: "device tree", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    /// A minimal arm64 Image header (booting.rst): code0/1, text_offset,
    /// image_size, flags, reserved, magic "ARM\x64" at 56.
    fn fake_image(text_offset: u64, image_size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn kernel_initrd_and_fdt_are_placed_without_overlap() {
        let size = 128u64 << 20;
        let mem: GuestRam = GuestRam::from_ranges(&[(GuestAddress(layout::RAM_BASE), size as usize)]).expect("mem");
        let dir = tempfile::tempdir().expect("dir");
        let k = dir.path().join("Image");
        std::fs::write(&k, fake_image(0, 8 << 20)).expect("write");
        let i = dir.path().join("initrd");
        std::fs::write(&i, vec![7u8; 3 << 20]).expect("write");
        let b = load(&mem, size, &k, Some(&i)).expect("load");
        assert_eq!(b.entry, layout::RAM_BASE);
        let (s, e) = b.initrd.expect("initrd");
        assert!(s >= b.kernel_end && e <= b.fdt && s % 4096 == 0, "{b:x?}");
        assert_eq!(b.fdt, layout::RAM_BASE + size - layout::FDT_MAX_SIZE);
        assert!(mem.address_in_range(GuestAddress(b.fdt + layout::FDT_MAX_SIZE - 1)));
        // Too little memory for the initrd: a clear refusal.
        std::fs::write(&i, vec![7u8; 120 << 20]).expect("write");
        let err = load(&mem, size, &k, Some(&i)).expect_err("too big").to_string();
        assert!(err.contains("more memory"), "{err}");
        // Not an Image at all, or a lying header.
        std::fs::write(&k, b"not a kernel").expect("write");
        assert!(load(&mem, size, &k, None).unwrap_err().to_string().contains("too short"));
        std::fs::write(&k, vec![0u8; 4096]).expect("write");
        assert!(load(&mem, size, &k, None).unwrap_err().to_string().contains("magic"));
        std::fs::write(&k, fake_image(0, 200 << 20)).expect("write");
        assert!(load(&mem, size, &k, None).unwrap_err().to_string().contains("more memory"));
        std::fs::write(&k, fake_image(123, 1 << 20)).expect("write");
        assert!(load(&mem, size, &k, None).unwrap_err().to_string().contains("text_offset"));
    }
}
