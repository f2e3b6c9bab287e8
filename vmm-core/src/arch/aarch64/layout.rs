//! Every guest-physical address Basalt's arm64 VMs use, in one place.
//!
//! The low 1 GiB holds devices, RAM starts at 1 GiB: the same shape as QEMU's
//! `virt` machine, so guest kernels need nothing special.

/// GICv3 distributor (64 KiB).
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// GICv3 ITS (128 KiB: control frame + translation frame), when asked for.
pub const GIC_ITS_BASE: u64 = 0x0808_0000;
pub const GIC_ITS_SIZE: u64 = 0x2_0000;
/// GICv3 redistributors: two 64 KiB frames (RD + SGI) per vCPU, contiguous.
pub const GIC_REDIST_BASE: u64 = 0x080A_0000;
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// The redistributor region ends where the serial port begins.
pub const GIC_REDIST_MAX_CPUS: u64 = (SERIAL_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE_PER_CPU;
// Basalt promises at least 8 vCPUs per VM; checked at compile time.
const _: () = assert!(GIC_REDIST_MAX_CPUS >= 8);
/// Serial console (16550-compatible, 4 KiB window).
pub const SERIAL_BASE: u64 = 0x0900_0000;
pub const SERIAL_SIZE: u64 = 0x1000;
/// virtio-mmio transports: 512-byte windows from here on.
pub const VIRTIO_MMIO_BASE: u64 = 0x0A00_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// Start of guest RAM.
pub const RAM_BASE: u64 = 0x4000_0000;

/// Number of interrupt IDs the vGIC is created with (SGIs, PPIs and SPIs);
/// a multiple of 32 as KVM_DEV_ARM_VGIC_GRP_NR_IRQS requires, and 64, KVM's
/// least: 32 SPIs hold the console and every virtio-mmio slot. Every one of
/// them is saved and restored register by register, a migration's downtime
/// mostly being such ioctls (basalt-vmm before protocol version 2 had 128).
pub const GIC_NR_IRQS: u32 = 64;
/// First shared peripheral interrupt ID.
pub const GIC_SPI_BASE: u32 = 32;
/// The architected timer PPIs (interrupt IDs): secure and non-secure
/// physical, virtual, hypervisor.
pub const TIMER_SEC_PHYS_PPI: u32 = 29;
pub const TIMER_PHYS_PPI: u32 = 30;
pub const TIMER_VIRT_PPI: u32 = 27;
pub const TIMER_HYP_PPI: u32 = 26;
/// Serial console interrupt (SPI, interrupt ID).
pub const SERIAL_SPI: u32 = 32;
/// virtio-mmio device `n` uses SPI `VIRTIO_SPI_BASE + n`.
pub const VIRTIO_SPI_BASE: u32 = 33;
pub const MAX_VIRTIO_DEVICES: u32 = GIC_NR_IRQS - VIRTIO_SPI_BASE;

/// The device tree goes in the last 2 MiB of RAM (Linux maps it with 2 MiB
/// blocks, so it gets a 2 MiB region of its own); the initrd just below it.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;

/// Where the flattened device tree is placed for a guest of `mem_size` bytes.
pub const fn fdt_addr(mem_size: u64) -> u64 {
    RAM_BASE + mem_size - FDT_MAX_SIZE
}

/// The GSI KVM's irqfd uses for an SPI (arm64 maps GSI n to SPI n + 32).
pub const fn spi_gsi(spi: u32) -> u32 {
    spi - GIC_SPI_BASE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_windows_do_not_overlap_and_stay_below_ram() {
        let windows = [
            (GIC_DIST_BASE, GIC_DIST_SIZE),
            (GIC_ITS_BASE, GIC_ITS_SIZE),
            (GIC_REDIST_BASE, GIC_REDIST_SIZE_PER_CPU * GIC_REDIST_MAX_CPUS),
            (SERIAL_BASE, SERIAL_SIZE),
            (VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE * 32),
        ];
        for (i, a) in windows.iter().enumerate() {
            assert!(a.0 + a.1 <= RAM_BASE, "window {i} reaches RAM");
            for b in &windows[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        assert_eq!(GIC_NR_IRQS % 32, 0);
    }
}
