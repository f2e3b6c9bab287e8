//! The cluster model: the records the Raft state machine holds. Each type
//! checks what it can check alone; checks across records (does the volume
//! exist, is the node Ready) are the state machine's.

pub mod events;
pub mod migrations;
pub mod names;
pub mod networks;
pub mod nodes;
pub mod profiles;
pub mod storage;
pub mod vms;
pub mod volumes;

pub use events::{Event, EventKind, EventLog, EventQuery};
pub use migrations::{Migration, MigrationId, MigrationPhase, MigrationReport, MigrationStats};
pub use networks::{Network, NetworkRequest, NicAddress, NicSpec};
pub use nodes::{Capacity, HostNic, NicSetting, Node, NodeId, NodeRegistration, NodeState};
pub use profiles::{ProfileKind, StorageProfile};
pub use storage::{ImageRemoval, StorageState, StorageStatus, StorageSubject};
pub use vms::{Boot, Disk, Observed, Power, Vm, VmPhase, VmSpec};
pub use volumes::Volume;
