//! Connecting to the coordinator with the user's bearer token.

use std::time::Duration;

use anyhow::Context;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use twinhead_proto::v1::run_service_client::RunServiceClient;

use crate::Connection;

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type RunClient = RunServiceClient<InterceptedService<Channel, Bearer>>;

pub async fn run_client(connection: &Connection) -> anyhow::Result<RunClient> {
    let bearer = match connection.token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .context("the token holds characters that cannot be sent in a header")?,
        ),
        None => None,
    };
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
    Ok(RunServiceClient::with_interceptor(channel, Bearer(bearer)))
}
