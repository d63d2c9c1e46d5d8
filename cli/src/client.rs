//! Connecting to the coordinator with the user's bearer token.

use std::time::Duration;

use anyhow::Context;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use twinhead_proto::auth::Bearer;
use twinhead_proto::v1::run_service_client::RunServiceClient;

use crate::Connection;

pub type RunClient = RunServiceClient<InterceptedService<Channel, Bearer>>;

pub async fn run_client(connection: &Connection) -> anyhow::Result<RunClient> {
    let bearer = Bearer::new(connection.token.as_deref())?;
    let endpoint = Endpoint::from_shared(connection.coordinator.clone())
        .with_context(|| format!("invalid coordinator URL {:?}", connection.coordinator))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the coordinator at {}: {}",
            connection.coordinator,
            crate::output::source_chain(&e)
        )
    })?;
    Ok(RunServiceClient::with_interceptor(channel, bearer))
}
