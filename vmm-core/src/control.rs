//! The VMM's control socket: a unix stream socket speaking newline-delimited
//! JSON, one request and one response per line.
//!
//! Request:  `{"v":1,"cmd":"status"}` (optional `"args":{...}`)
//! Response: `{"v":1,"ok":true,"result":{...}}` or `{"v":1,"ok":false,"error":"..."}`
//! Commands: status, pause, resume, shutdown, counters, vgic-state.
//! A request with another `v` is refused, so old clients fail clearly.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub v: u32,
    pub cmd: String,
    #[serde(default)]
    pub args: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: Value) -> Self {
        Response { v: VERSION, ok: true, result, error: None }
    }
    pub fn err(e: impl Into<String>) -> Self {
        Response { v: VERSION, ok: false, result: Value::Null, error: Some(e.into()) }
    }
}

/// Parses one request line; a bad line gets an error response, not a crash.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    let r: Request = serde_json::from_str(line).map_err(|e| Response::err(format!("bad request: {e}")))?;
    if r.v != VERSION {
        return Err(Response::err(format!("protocol version {} is not supported (this VMM speaks {VERSION})", r.v)));
    }
    Ok(r)
}

/// Client side: one request, one response.
pub fn call(socket: &Path, cmd: &str, args: Value, timeout: Duration) -> std::io::Result<Response> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    let req = Request { v: VERSION, cmd: cmd.into(), args };
    let mut line = serde_json::to_string(&req).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp)?;
    serde_json::from_str(&resp).map_err(|e| std::io::Error::other(format!("bad response {resp:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_get_error_responses() {
        let r = parse_request(r#"{"v":1,"cmd":"status"}"#).expect("ok");
        assert_eq!(r.cmd, "status");
        assert!(parse_request("not json").unwrap_err().error.expect("msg").contains("bad request"));
        assert!(parse_request(r#"{"v":2,"cmd":"status"}"#).unwrap_err().error.expect("msg").contains("version 2"));
        let ok = serde_json::to_string(&Response::ok(serde_json::json!({"state":"running"}))).expect("ser");
        assert_eq!(ok, r#"{"v":1,"ok":true,"result":{"state":"running"}}"#);
    }
}
