//! The flattened device tree that describes a Basalt VM to its kernel:
//! memory, CPUs (by MPIDR), PSCI, the GICv3, the architected timer, the
//! serial port and the virtio-mmio transports, plus `chosen` (command line,
//! initrd). Plain data, so it is unit-tested on any host.

use vm_fdt::{FdtWriter, FdtWriterResult};

use super::layout;

const GIC_PHANDLE: u32 = 1;
// Interrupt specifier cells (see the arm,gic-v3 binding).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

pub struct FdtParams<'a> {
    /// MPIDR_EL1 of each vCPU, as KVM reports it.
    pub mpidrs: &'a [u64],
    pub mem_size: u64,
    pub cmdline: &'a str,
    /// Guest-physical start and end (exclusive) of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// Base address and SPI of each virtio-mmio transport.
    pub virtio: &'a [(u64, u32)],
    /// Describe the GICv3 ITS.
    pub its: bool,
}

pub fn create_fdt(p: &FdtParams) -> FdtWriterResult<Vec<u8>> {
    let mut f = FdtWriter::new()?;
    let root = f.begin_node("")?;
    f.property_string("compatible", "linux,dummy-virt")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let chosen = f.begin_node("chosen")?;
    f.property_string("bootargs", p.cmdline)?;
    f.property_string("stdout-path", &format!("/uart@{:x}", layout::SERIAL_BASE))?;
    if let Some((start, end)) = p.initrd {
        f.property_u64("linux,initrd-start", start)?;
        f.property_u64("linux,initrd-end", end)?;
    }
    f.end_node(chosen)?;

    let mem = f.begin_node(&format!("memory@{:x}", layout::RAM_BASE))?;
    f.property_string("device_type", "memory")?;
    f.property_array_u64("reg", &[layout::RAM_BASE, p.mem_size])?;
    f.end_node(mem)?;

    let cpus = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 0)?;
    for (i, mpidr) in p.mpidrs.iter().enumerate() {
        let cpu = f.begin_node(&format!("cpu@{i}"))?;
        f.property_string("device_type", "cpu")?;
        f.property_string("compatible", "arm,arm-v8")?;
        f.property_string("enable-method", "psci")?;
        // Affinity fields only (Aff3 and Aff2..0), as the cpus binding wants.
        f.property_u64("reg", mpidr & 0xff_00ff_ffff)?;
        f.end_node(cpu)?;
    }
    f.end_node(cpus)?;

    let psci = f.begin_node("psci")?;
    f.property_string_list("compatible", vec!["arm,psci-0.2".into(), "arm,psci".into()])?;
    f.property_string("method", "hvc")?;
    f.end_node(psci)?;

    let redist_size = layout::GIC_REDIST_SIZE_PER_CPU * p.mpidrs.len() as u64;
    let gic = f.begin_node(&format!("intc@{:x}", layout::GIC_DIST_BASE))?;
    f.property_string("compatible", "arm,gic-v3")?;
    f.property_null("interrupt-controller")?;
    f.property_u32("#interrupt-cells", 3)?;
    f.property_array_u64("reg", &[layout::GIC_DIST_BASE, layout::GIC_DIST_SIZE, layout::GIC_REDIST_BASE, redist_size])?;
    f.property_u32("phandle", GIC_PHANDLE)?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_null("ranges")?;
    if p.its {
        let its = f.begin_node(&format!("msi-controller@{:x}", layout::GIC_ITS_BASE))?;
        f.property_string("compatible", "arm,gic-v3-its")?;
        f.property_null("msi-controller")?;
        f.property_u32("#msi-cells", 1)?;
        f.property_array_u64("reg", &[layout::GIC_ITS_BASE, layout::GIC_ITS_SIZE])?;
        f.end_node(its)?;
    }
    f.end_node(gic)?;

    let timer = f.begin_node("timer")?;
    f.property_string("compatible", "arm,armv8-timer")?;
    f.property_null("always-on")?;
    let mut irqs = Vec::new();
    for ppi in [layout::TIMER_SEC_PHYS_PPI, layout::TIMER_PHYS_PPI, layout::TIMER_VIRT_PPI, layout::TIMER_HYP_PPI] {
        irqs.extend_from_slice(&[GIC_PPI, ppi - 16, IRQ_TYPE_LEVEL_HIGH]);
    }
    f.property_array_u32("interrupts", &irqs)?;
    f.end_node(timer)?;

    let uart = f.begin_node(&format!("uart@{:x}", layout::SERIAL_BASE))?;
    f.property_string("compatible", "ns16550a")?;
    f.property_array_u64("reg", &[layout::SERIAL_BASE, layout::SERIAL_SIZE])?;
    f.property_u32("clock-frequency", 1_843_200)?;
    f.property_array_u32("interrupts", &[GIC_SPI, layout::SERIAL_SPI - layout::GIC_SPI_BASE, IRQ_TYPE_EDGE_RISING])?;
    f.end_node(uart)?;

    for (base, spi) in p.virtio {
        let v = f.begin_node(&format!("virtio_mmio@{base:x}"))?;
        f.property_string("compatible", "virtio,mmio")?;
        f.property_array_u64("reg", &[*base, layout::VIRTIO_MMIO_SIZE])?;
        f.property_array_u32("interrupts", &[GIC_SPI, spi - layout::GIC_SPI_BASE, IRQ_TYPE_EDGE_RISING])?;
        f.property_null("dma-coherent")?;
        f.end_node(v)?;
    }

    f.end_node(root)?;
    f.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_is_well_formed_and_small() {
        let fdt = create_fdt(&FdtParams {
            mpidrs: &[0x8000_0000, 0x8000_0001],
            mem_size: 256 << 20,
            cmdline: "console=ttyS0 panic=-1",
            initrd: Some((0x4800_0000, 0x4810_0000)),
            virtio: &[(layout::VIRTIO_MMIO_BASE, layout::VIRTIO_SPI_BASE)],
            its: true,
        })
        .expect("fdt");
        assert_eq!(&fdt[..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");
        let total = u32::from_be_bytes([fdt[4], fdt[5], fdt[6], fdt[7]]) as usize;
        assert_eq!(total, fdt.len());
        assert!((fdt.len() as u64) < layout::FDT_MAX_SIZE);
        let text = String::from_utf8_lossy(&fdt);
        for needle in [
            "console=ttyS0 panic=-1",
            "arm,gic-v3",
            "arm,psci-0.2",
            "virtio,mmio",
            "ns16550a",
            "cpu@1",
            "arm,gic-v3-its",
        ] {
            assert!(text.contains(needle), "{needle}");
        }
    }
}
