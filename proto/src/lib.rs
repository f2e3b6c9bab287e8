//! Generated gRPC types and services of Basalt's API (package `basalt.v1`).
//!
//! This crate holds the `.proto` files, what tonic/prost generate from them
//! (so every binary speaks the same wire format), and the rules for the names
//! and addresses the messages carry ([`names`]).

pub mod names;

/// Package `basalt.v1`: the public cluster API.
pub mod v1 {
    tonic::include_proto!("basalt.v1");
}

/// Package `basalt.raft.v1`: controller-to-controller Raft traffic (internal).
pub mod raft {
    pub mod v1 {
        tonic::include_proto!("basalt.raft.v1");
    }
}

/// Encoded `FileDescriptorSet` of every service, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("basalt_descriptor");

#[cfg(test)]
mod tests {
    use super::v1::{ClusterStatus, ControllerInfo};
    use prost::Message;

    #[test]
    fn cluster_status_round_trips_through_the_wire_format() {
        let status = ClusterStatus {
            version: "0.1.0".into(),
            controllers: vec![
                ControllerInfo { id: 1, address: "127.0.0.1:7001".into(), is_leader: true, is_voter: true },
                ControllerInfo { id: 2, address: "127.0.0.1:7002".into(), is_leader: false, is_voter: false },
            ],
            leader_id: 1,
            term: 7,
            ..Default::default()
        };
        let bytes = status.encode_to_vec();
        let back = ClusterStatus::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, status);
        // A message from a newer peer with an unknown field (number 99) still decodes.
        let mut newer = bytes.clone();
        newer.extend_from_slice(&[0x98, 0x06, 0x01]); // field 99, varint, value 1
        assert_eq!(ClusterStatus::decode(newer.as_slice()).expect("decodes"), status);
    }

    #[test]
    fn service_has_its_package_qualified_name() {
        use super::v1::cluster_service_server::SERVICE_NAME;
        assert_eq!(SERVICE_NAME, "basalt.v1.ClusterService");
    }
}
