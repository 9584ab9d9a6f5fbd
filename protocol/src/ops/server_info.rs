//! `SERVER_INFO` (0x0003): facts about the server.

use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// Ask for the server's facts (an empty body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GetServerInfo;

/// Facts about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// settlegate version.
    pub server_version: String,
    /// Protocol version (1).
    pub protocol_version: u16,
    /// Engine shards.
    pub shards: u16,
    /// Largest body.
    pub body_length_max: u32,
    /// Requests in flight per connection.
    pub in_flight_max: u16,
    /// Providers: code and name.
    pub providers: Vec<(u32, String)>,
}

impl Codec for ServerInfo {
    fn encode(&self, w: &mut Writer<'_>) {
        w.str8(&self.server_version)
            .u16(self.protocol_version)
            .u16(self.shards)
            .u32(self.body_length_max)
            .u16(self.in_flight_max)
            .u16(self.providers.len() as u16);
        for (code, name) in &self.providers {
            w.u32(*code).str8(name);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<ServerInfo, BodyError> {
        let server_version = r.str8("server_version")?.to_owned();
        let protocol_version = r.u16("protocol_version")?;
        let shards = r.u16("shards")?;
        let body_length_max = r.u32("body_length_max")?;
        let in_flight_max = r.u16("in_flight_max")?;
        let count = r.u16("provider_count")?;
        let mut providers = Vec::new();
        for _ in 0..count {
            providers.push((r.u32("code")?, r.str8("name")?.to_owned()));
        }
        Ok(ServerInfo {
            server_version,
            protocol_version,
            shards,
            body_length_max,
            in_flight_max,
            providers,
        })
    }
}

impl Operation for GetServerInfo {
    const OPCODE: u16 = 0x0003;
    const NAME: &'static str = "server_info";
    const UNAUTHENTICATED: bool = true;
    type Reply = ServerInfo;

    fn encode(&self, _: &mut Writer<'_>) {}

    fn decode(_: u16, _: &mut Reader<'_>) -> Result<GetServerInfo, BodyError> {
        Ok(GetServerInfo)
    }
}
