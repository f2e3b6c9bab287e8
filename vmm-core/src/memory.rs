//! Guest RAM: an anonymous mapping registered with KVM as a memory slot.
//!
//! The mapping starts on a 2 MiB boundary and is marked for transparent huge
//! pages, so KVM can back the guest with 2 MiB stage-2 blocks. A mapping at
//! an arbitrary page offset (what a plain mmap returns) forces 4 KiB stage-2
//! pages: one fault per 4 KiB touched, several times more KVM exits at boot.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

const ALIGN: usize = 2 << 20;

/// Owns guest RAM's mapping; unmapped on drop. Keep it alive for as long as
/// any `GuestMemoryMmap` built on it (the regions do not own the mapping).
pub struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory; access goes through vm-memory's
// volatile accessors, and only the owner unmaps it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` describe a mapping this struct made and owns.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Maps `size` bytes of anonymous memory on a 2 MiB boundary.
pub fn map_aligned(size: usize) -> std::io::Result<Mapping> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let total = size.checked_add(ALIGN).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a fresh anonymous mapping; no existing memory is affected.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), total, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = (raw as usize).next_multiple_of(ALIGN);
    let head = start - raw as usize;
    let tail = total - head - size;
    // SAFETY: both ranges lie inside the mapping made above and are not used.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
        // Advice only: without THP the guest still runs, on 4 KiB pages.
        libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    Ok(Mapping { addr: start as *mut libc::c_void, len: size })
}

/// Allocates `size` bytes of guest RAM at `base` and maps them into the VM.
pub fn create(vm: &VmFd, base: u64, size: usize) -> Result<(GuestMemoryMmap, Mapping), String> {
    let map = map_aligned(size).map_err(|e| format!("guest RAM of {size} bytes: {e}"))?;
    // SAFETY: `map` is a live mapping of exactly `size` bytes with these
    // protections; the caller keeps it alive longer than the region.
    let region = unsafe { MmapRegionBuilder::new(size).with_raw_mmap_pointer(map.addr as *mut u8) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| e.to_string())?;
    let region = GuestRegionMmap::new(region, GuestAddress(base)).ok_or("guest RAM region overflows")?;
    let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(|e| e.to_string())?;
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: the mapping outlives the VM fd (the caller holds `Mapping`
        // at least as long), and the mmap never moves.
        unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("map guest memory: {e}"))?;
    }
    Ok((mem, map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_2mib_aligned_and_usable() {
        let m = map_aligned(8 << 20).expect("map");
        assert_eq!(m.addr as usize % ALIGN, 0);
        // SAFETY: inside the 8 MiB mapping just made.
        unsafe { std::ptr::write_volatile((m.addr as *mut u8).add((8 << 20) - 1), 7) };
    }
}
