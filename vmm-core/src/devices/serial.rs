//! The serial console: a 16550A (vm-superio) whose output goes to the VMM's
//! stdout or a file, and whose interrupt is an eventfd the VM wires to an SPI.

use std::io::Write;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::MmioDevice;

/// Raises the serial interrupt by writing an eventfd (a KVM irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type ConsoleOut = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
    /// Bytes the guest wrote, for the control socket's counters.
    pub tx_bytes: u64,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice { uart: Serial::new(EventFdTrigger(irq), out), tx_bytes: 0 }
    }

    /// Input for the guest (typed on an attached console).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// How many input bytes the receive FIFO can take now.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl crate::persist::Persist for SerialDevice {
    type State = crate::persist::SerialState;
    type Error = std::io::Error;

    fn save(&self) -> Result<Self::State, Self::Error> {
        let s = self.uart.state();
        Ok(crate::persist::SerialState {
            version: crate::persist::STATE_VERSION,
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    fn restore(&mut self, s: &Self::State) -> Result<(), Self::Error> {
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        // Rebuild the UART around its current output and interrupt eventfd
        // (dup'd: both fds are the same eventfd, the KVM irqfd).
        let irq = || self.uart.interrupt_evt().0.try_clone();
        let placeholder = Serial::new(EventFdTrigger(irq()?), Box::new(std::io::sink()) as ConsoleOut);
        let trigger = EventFdTrigger(irq()?);
        let old = std::mem::replace(&mut self.uart, placeholder);
        self.uart = Serial::from_state(&st, trigger, NoEvents, old.into_writer())
            .map_err(|e| std::io::Error::other(format!("serial state: {e:?}")))?;
        Ok(())
    }
}

impl MmioDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The 16550 has byte-wide registers (reg-io-width 1); wider or
        // out-of-range accesses read as zero rather than alias.
        data.fill(0);
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if offset == 0 {
                self.tx_bytes += 1;
            }
            // An error here is the output sink failing (a closed stdout, a full
            // disk): the guest must keep running, so the byte is dropped.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_console_and_bad_widths_are_ignored() {
        let sink = Sink::default();
        let mut s = SerialDevice::new(EventFd::new(0).expect("evt"), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        s.write(0, &[1, 2, 3, 4]); // 32-bit write: ignored
        let mut d = [0xffu8; 4];
        s.read(5, &mut d);
        assert_eq!(d, [0; 4]);
        let mut lsr = [0u8; 1];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
        assert_eq!(&*sink.0.lock().expect("sink"), b"hi\n");
        assert_eq!(s.tx_bytes, 3);
    }
}
