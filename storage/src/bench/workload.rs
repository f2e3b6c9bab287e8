//! What a benchmark run does, and the checks that refuse a bad one before any I/O.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Sector size every backend accepts; RBD and O_DIRECT files both need it.
pub const SECTOR: u32 = 512;
/// Deeper queues than virtio-blk would ever present only measure the backend's queueing.
pub const MAX_QUEUE_DEPTH: u32 = 1024;
/// One thread per job; more than this on a node is a mistake, not a workload.
pub const MAX_JOBS: u32 = 256;
/// Larger than any RBD object (4 MiB by default) with margin; bigger blocks only allocate.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Every in-flight request owns its buffer; above this the run would exhaust memory
/// rather than measure storage.
pub const MAX_IN_FLIGHT_BYTES: u64 = 4 << 30;
/// Keeps `Instant + Duration` far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Each job walks its share of the range block by block, wrapping at the end.
    Sequential,
    /// Uniformly random block-aligned offsets within the range.
    Random,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    Read,
    Write,
    /// Each request is a read with probability `read_percent`/100.
    Mixed {
        read_percent: u8,
    },
}

impl Mix {
    pub fn writes(&self) -> bool {
        !matches!(self, Mix::Read | Mix::Mixed { read_percent: 100 })
    }

    /// Reads per hundred requests.
    pub fn read_percent(&self) -> u8 {
        match self {
            Mix::Read => 100,
            Mix::Write => 0,
            Mix::Mixed { read_percent } => *read_percent,
        }
    }
}

/// When the measured phase ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// Stop submitting after this long; requests already in flight still count.
    #[serde(rename = "runtime_s", with = "secs")]
    Runtime(Duration),
    /// Submit exactly `total_bytes / block_size` measured requests across all jobs
    /// (rounded down: the run never moves more than asked). Ramp requests are extra.
    TotalBytes(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    pub pattern: Pattern,
    pub mix: Mix,
    /// Bytes per request; a multiple of 512.
    pub block_size: u32,
    /// Requests each job keeps in flight.
    pub queue_depth: u32,
    /// Threads, each with its own backend.
    pub jobs: u32,
    pub limit: Limit,
    /// Warm-up before measuring (caches, RBD object creation, CPU frequency);
    /// requests submitted during it are excluded from every statistic.
    #[serde(rename = "ramp_s", with = "secs")]
    pub ramp: Duration,
    /// Start of the tested range, a multiple of 512.
    pub offset: u64,
    /// Length of the tested range; `None` runs to the end of the device.
    pub length: Option<u64>,
    /// Seeds offsets and the read/write choice so runs are repeatable.
    pub seed: u64,
    /// How long a job waits without any completion before it declares the
    /// backend stuck; a benchmark must fail, not hang, on a wedged cluster.
    #[serde(rename = "completion_timeout_s", with = "secs")]
    pub completion_timeout: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            pattern: Pattern::Random,
            mix: Mix::Read,
            block_size: 4096,
            queue_depth: 1,
            jobs: 1,
            limit: Limit::Runtime(Duration::from_secs(10)),
            ramp: Duration::ZERO,
            offset: 0,
            length: None,
            seed: 0x0B45_A17B_E4C4,
            completion_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a workload was refused. Every variant names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    #[error("block size must not be 0")]
    BlockSizeZero,
    #[error("block size {block_size} is not a multiple of {SECTOR} bytes")]
    BlockSizeUnaligned { block_size: u32 },
    #[error("block size {block_size} is above the maximum of {MAX_BLOCK_SIZE} bytes")]
    BlockSizeTooLarge { block_size: u32 },
    #[error("queue depth must be at least 1")]
    QueueDepthZero,
    #[error("queue depth {queue_depth} is above the maximum of {MAX_QUEUE_DEPTH}")]
    QueueDepthTooLarge { queue_depth: u32 },
    #[error("jobs must be at least 1")]
    JobsZero,
    #[error("{jobs} jobs is above the maximum of {MAX_JOBS}")]
    JobsTooMany { jobs: u32 },
    #[error("read percentage {read_percent} is above 100")]
    ReadPercent { read_percent: u8 },
    #[error(
        "{in_flight} bytes in flight (block size x queue depth x jobs) is above the maximum of {MAX_IN_FLIGHT_BYTES}"
    )]
    InFlightTooLarge { in_flight: u64 },
    #[error("runtime must be longer than 0")]
    RuntimeZero,
    #[error("total bytes {total_bytes} is less than one block of {block_size} bytes")]
    TotalBytesBelowBlock { total_bytes: u64, block_size: u32 },
    #[error("{what} of {secs}s is above the maximum of {max}s", max = MAX_DURATION.as_secs())]
    DurationTooLong { what: &'static str, secs: u64 },
    #[error("completion timeout must be longer than 0")]
    CompletionTimeoutZero,
    #[error("range offset {offset} is not a multiple of {SECTOR} bytes")]
    OffsetUnaligned { offset: u64 },
    #[error("range length must not be 0")]
    RangeEmpty,
    #[error("range {offset}+{length} is outside the device of {size} bytes")]
    RangeOutsideDevice { offset: u64, length: u64, size: u64 },
    #[error("block size {block_size} is larger than the tested range of {length} bytes")]
    BlockLargerThanRange { block_size: u32, length: u64 },
}

impl Workload {
    /// Refuses anything that would make the run meaningless, unbounded or
    /// out of range on a device of `device_size` bytes.
    pub fn validate(&self, device_size: u64) -> Result<(), WorkloadError> {
        let bs = self.block_size;
        if bs == 0 {
            return Err(WorkloadError::BlockSizeZero);
        }
        if !bs.is_multiple_of(SECTOR) {
            return Err(WorkloadError::BlockSizeUnaligned { block_size: bs });
        }
        if bs > MAX_BLOCK_SIZE {
            return Err(WorkloadError::BlockSizeTooLarge { block_size: bs });
        }
        if self.queue_depth == 0 {
            return Err(WorkloadError::QueueDepthZero);
        }
        if self.queue_depth > MAX_QUEUE_DEPTH {
            return Err(WorkloadError::QueueDepthTooLarge { queue_depth: self.queue_depth });
        }
        if self.jobs == 0 {
            return Err(WorkloadError::JobsZero);
        }
        if self.jobs > MAX_JOBS {
            return Err(WorkloadError::JobsTooMany { jobs: self.jobs });
        }
        if let Mix::Mixed { read_percent } = self.mix {
            if read_percent > 100 {
                return Err(WorkloadError::ReadPercent { read_percent });
            }
        }
        // Bounded by the checks above, so no overflow in u64.
        let in_flight = u64::from(bs) * u64::from(self.queue_depth) * u64::from(self.jobs);
        if in_flight > MAX_IN_FLIGHT_BYTES {
            return Err(WorkloadError::InFlightTooLarge { in_flight });
        }
        match self.limit {
            Limit::Runtime(d) if d.is_zero() => return Err(WorkloadError::RuntimeZero),
            Limit::Runtime(d) => check_duration("runtime", d)?,
            Limit::TotalBytes(total_bytes) if total_bytes < u64::from(bs) => {
                return Err(WorkloadError::TotalBytesBelowBlock { total_bytes, block_size: bs });
            }
            Limit::TotalBytes(_) => {}
        }
        check_duration("ramp", self.ramp)?;
        if self.completion_timeout.is_zero() {
            return Err(WorkloadError::CompletionTimeoutZero);
        }
        check_duration("completion timeout", self.completion_timeout)?;
        self.range(device_size).map(|_| ())
    }

    /// The tested byte range `(offset, length)` on a device of `device_size` bytes.
    pub fn range(&self, device_size: u64) -> Result<(u64, u64), WorkloadError> {
        let offset = self.offset;
        if !offset.is_multiple_of(u64::from(SECTOR)) {
            return Err(WorkloadError::OffsetUnaligned { offset });
        }
        let length = match self.length {
            Some(0) => return Err(WorkloadError::RangeEmpty),
            Some(l) => l,
            None => device_size.saturating_sub(offset),
        };
        match offset.checked_add(length) {
            Some(end) if end <= device_size && length > 0 => {}
            _ => return Err(WorkloadError::RangeOutsideDevice { offset, length, size: device_size }),
        }
        if u64::from(self.block_size) > length {
            return Err(WorkloadError::BlockLargerThanRange { block_size: self.block_size, length });
        }
        Ok((offset, length))
    }
}

fn check_duration(what: &'static str, d: Duration) -> Result<(), WorkloadError> {
    if d > MAX_DURATION {
        return Err(WorkloadError::DurationTooLong { what, secs: d.as_secs() });
    }
    Ok(())
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pattern = match self.pattern {
            Pattern::Sequential => "seq",
            Pattern::Random => "rand",
        };
        match self.mix {
            Mix::Read => write!(f, "{pattern} read")?,
            Mix::Write => write!(f, "{pattern} write")?,
            Mix::Mixed { read_percent } => write!(f, "{pattern} mixed {read_percent}% read")?,
        }
        write!(f, ", bs {}, qd {}, jobs {}, ", bytes(u64::from(self.block_size)), self.queue_depth, self.jobs)?;
        match self.limit {
            Limit::Runtime(d) => write!(f, "runtime {d:?}")?,
            Limit::TotalBytes(b) => write!(f, "total {}", bytes(b))?,
        }
        if !self.ramp.is_zero() {
            write!(f, ", ramp {:?}", self.ramp)?;
        }
        match self.length {
            Some(l) => write!(f, ", range {}+{}", self.offset, bytes(l))?,
            None if self.offset != 0 => write!(f, ", range {}..end", self.offset)?,
            None => {}
        }
        write!(f, ", seed {:#x}", self.seed)
    }
}

/// Binary units, exact when the value is a whole number of them.
pub(crate) fn bytes(b: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{}{unit}", b >> shift);
        }
    }
    format!("{b}B")
}

/// Durations as fractional seconds: what people write in a JSON workload file.
mod secs {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        // Refuses negative, NaN and overflowing values instead of panicking.
        Duration::try_from_secs_f64(secs).map_err(|e| D::Error::custom(format!("{secs} seconds: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn refused(w: Workload, size: u64) -> WorkloadError {
        w.validate(size).expect_err("workload must be refused")
    }

    #[test]
    fn the_default_workload_is_valid() {
        Workload::default().validate(MIB).expect("valid");
    }

    #[test]
    fn each_bad_input_is_refused_with_its_value() {
        let w = Workload::default;
        assert_eq!(refused(Workload { block_size: 0, ..w() }, MIB), WorkloadError::BlockSizeZero);
        assert_eq!(
            refused(Workload { block_size: 1000, ..w() }, MIB),
            WorkloadError::BlockSizeUnaligned { block_size: 1000 }
        );
        assert_eq!(
            refused(Workload { block_size: 128 << 20, ..w() }, u64::MAX),
            WorkloadError::BlockSizeTooLarge { block_size: 128 << 20 }
        );
        assert_eq!(refused(Workload { queue_depth: 0, ..w() }, MIB), WorkloadError::QueueDepthZero);
        assert_eq!(
            refused(Workload { queue_depth: 1025, ..w() }, MIB),
            WorkloadError::QueueDepthTooLarge { queue_depth: 1025 }
        );
        assert_eq!(refused(Workload { jobs: 0, ..w() }, MIB), WorkloadError::JobsZero);
        assert_eq!(refused(Workload { jobs: 257, ..w() }, MIB), WorkloadError::JobsTooMany { jobs: 257 });
        assert_eq!(
            refused(Workload { mix: Mix::Mixed { read_percent: 101 }, ..w() }, MIB),
            WorkloadError::ReadPercent { read_percent: 101 }
        );
        assert!(matches!(
            refused(Workload { block_size: 16 << 20, queue_depth: 1024, ..w() }, u64::MAX),
            WorkloadError::InFlightTooLarge { .. }
        ));
        assert_eq!(refused(Workload { limit: Limit::Runtime(Duration::ZERO), ..w() }, MIB), WorkloadError::RuntimeZero);
        assert_eq!(
            refused(Workload { limit: Limit::TotalBytes(4095), ..w() }, MIB),
            WorkloadError::TotalBytesBelowBlock { total_bytes: 4095, block_size: 4096 }
        );
        assert!(matches!(
            refused(Workload { ramp: Duration::MAX, ..w() }, MIB),
            WorkloadError::DurationTooLong { what: "ramp", .. }
        ));
        assert_eq!(
            refused(Workload { completion_timeout: Duration::ZERO, ..w() }, MIB),
            WorkloadError::CompletionTimeoutZero
        );
        assert_eq!(refused(Workload { offset: 100, ..w() }, MIB), WorkloadError::OffsetUnaligned { offset: 100 });
        assert_eq!(refused(Workload { length: Some(0), ..w() }, MIB), WorkloadError::RangeEmpty);
        assert_eq!(
            refused(Workload { offset: 512, length: Some(MIB), ..w() }, MIB),
            WorkloadError::RangeOutsideDevice { offset: 512, length: MIB, size: MIB }
        );
        assert_eq!(
            refused(Workload { offset: 2 * MIB, ..w() }, MIB),
            WorkloadError::RangeOutsideDevice { offset: 2 * MIB, length: 0, size: MIB }
        );
        assert!(matches!(
            refused(Workload { offset: u64::MAX - 511, length: Some(4096), ..w() }, u64::MAX),
            WorkloadError::RangeOutsideDevice { .. }
        ));
        assert_eq!(
            refused(Workload { length: Some(2048), ..w() }, MIB),
            WorkloadError::BlockLargerThanRange { block_size: 4096, length: 2048 }
        );
        assert_eq!(refused(w(), 0), WorkloadError::RangeOutsideDevice { offset: 0, length: 0, size: 0 });
    }

    #[test]
    fn messages_name_the_offending_value() {
        let msg = refused(Workload { queue_depth: 4096, ..Workload::default() }, MIB).to_string();
        assert_eq!(msg, "queue depth 4096 is above the maximum of 1024");
        let msg = refused(Workload { block_size: 1000, ..Workload::default() }, MIB).to_string();
        assert_eq!(msg, "block size 1000 is not a multiple of 512 bytes");
    }

    #[test]
    fn range_defaults_to_the_rest_of_the_device() {
        let w = Workload { offset: 4096, ..Workload::default() };
        assert_eq!(w.range(MIB), Ok((4096, MIB - 4096)));
        let w = Workload { offset: 4096, length: Some(8192), ..Workload::default() };
        assert_eq!(w.range(MIB), Ok((4096, 8192)));
    }

    #[test]
    fn json_round_trips_and_durations_are_seconds() {
        let w = Workload {
            pattern: Pattern::Sequential,
            mix: Mix::Mixed { read_percent: 70 },
            limit: Limit::Runtime(Duration::from_millis(1500)),
            ramp: Duration::from_millis(50),
            length: Some(MIB),
            completion_timeout: Duration::from_millis(100),
            ..Workload::default()
        };
        let json = serde_json::to_value(&w).expect("serialize");
        assert_eq!(json["limit"]["runtime_s"], 1.5);
        assert_eq!(json["ramp_s"], 0.05);
        assert_eq!(json["mix"]["mixed"]["read_percent"], 70);
        assert_eq!(json["pattern"], "sequential");
        let back: Workload = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, w);
    }

    #[test]
    fn partial_json_takes_defaults_and_bad_durations_are_refused() {
        let w: Workload =
            serde_json::from_str(r#"{"mix":"write","limit":{"total_bytes":1048576}}"#).expect("deserialize");
        assert_eq!(w.mix, Mix::Write);
        assert_eq!(w.limit, Limit::TotalBytes(MIB));
        assert_eq!(w.block_size, Workload::default().block_size);
        assert!(serde_json::from_str::<Workload>(r#"{"ramp_s":-1}"#).is_err());
    }
}
