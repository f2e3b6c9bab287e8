//! `basalt-agent`: validates its configuration. Registration, assignments and
//! VMM supervision arrive with the agent issue; until then it says so.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

mod config;

#[derive(Parser, Debug)]
#[command(version, about = "Basalt node agent: runs this host's VMs")]
struct Args {
    /// TOML configuration file.
    #[arg(long, short, env = "BASALT_AGENT_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match config::Config::load(&args.config) {
        Ok(cfg) => {
            eprintln!(
                "basalt-agent: config for host {} ({}, {} labels) is valid; running VMs is not implemented yet",
                cfg.host_id,
                cfg.address,
                cfg.labels.len()
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("basalt-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
