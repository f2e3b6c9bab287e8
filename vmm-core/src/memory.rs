//! Guest RAM: an anonymous mapping registered with KVM as a memory slot.
//!
//! The mapping starts on a 2 MiB boundary and is marked for transparent huge
//! pages, so KVM can back the guest with 2 MiB stage-2 blocks. A mapping at
//! an arbitrary page offset (what a plain mmap returns) forces 4 KiB stage-2
//! pages: one fault per 4 KiB touched, several times more KVM exits at boot.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

/// Guest RAM as the VMM sees it. Every write the VMM itself makes through
/// it (virtio data, status bytes, used rings) sets a bit in the region's
/// page bitmap, which live migration ORs into KVM's dirty log: KVM only
/// sees the guest's own writes.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// One KVM memory slot: where it sits for the guest and in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSlot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
    pub host_addr: u64,
}

impl MemSlot {
    fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.guest_addr,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }
}

/// The host's page size: what KVM's dirty log and vm-memory's bitmaps count in.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Where guest RAM starts and how many bytes it has in all.
pub fn extent(mem: &GuestRam) -> (u64, u64) {
    let base = mem.iter().map(|r| r.start_addr().0).min().unwrap_or(0);
    (base, mem.iter().map(|r| r.len()).sum())
}

/// Turns KVM's dirty page logging on or off for every slot (flags only; the
/// mapping stays where it is).
pub fn set_dirty_logging(vm: &VmFd, slots: &[MemSlot], on: bool) -> Result<(), kvm_ioctls::Error> {
    let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    for s in slots {
        // SAFETY: the same slot, guest range and host mapping as when it was
        // created (see `create`); only the logging flag changes.
        unsafe { vm.set_user_memory_region(s.region(flags)) }?;
    }
    Ok(())
}

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
pub fn create(vm: &VmFd, base: u64, size: usize) -> Result<(GuestRam, Mapping, Vec<MemSlot>), String> {
    let map = map_aligned(size).map_err(|e| format!("guest RAM of {size} bytes: {e}"))?;
    let bitmap = <AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(size);
    // SAFETY: `map` is a live mapping of exactly `size` bytes with these
    // protections; the caller keeps it alive longer than the region.
    let region = unsafe { MmapRegionBuilder::new_with_bitmap(size, bitmap).with_raw_mmap_pointer(map.addr as *mut u8) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| e.to_string())?;
    let region = GuestRegionMmap::new(region, GuestAddress(base)).ok_or("guest RAM region overflows")?;
    let mem = GuestRam::from_regions(vec![region]).map_err(|e| e.to_string())?;
    let mut slots = Vec::new();
    for (slot, r) in mem.iter().enumerate() {
        let s =
            MemSlot { slot: slot as u32, guest_addr: r.start_addr().0, size: r.len(), host_addr: r.as_ptr() as u64 };
        // SAFETY: the mapping outlives the VM fd (the caller holds `Mapping`
        // at least as long), and the mmap never moves.
        unsafe { vm.set_user_memory_region(s.region(0)) }.map_err(|e| format!("map guest memory: {e}"))?;
        slots.push(s);
    }
    Ok((mem, map, slots))
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
