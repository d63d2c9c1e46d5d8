//! Connecting to the coordinator: `http://` or `https://` (see
//! `twinhead_proto::tls`), with a bearer token.

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use twinhead_proto::auth::Bearer;
use twinhead_proto::v1::dataprep_service_client::DataprepServiceClient;
use twinhead_proto::v1::dataset_service_client::DatasetServiceClient;
use twinhead_proto::v1::run_service_client::RunServiceClient;

use crate::Connection;

pub type Authed = InterceptedService<Channel, Bearer>;
pub type RunClient = RunServiceClient<Authed>;
pub type DatasetClient = DatasetServiceClient<Authed>;

async fn channel(connection: &Connection) -> anyhow::Result<(Channel, Bearer)> {
    let bearer = Bearer::new(connection.token()?.as_deref())?;
    let endpoint = twinhead_proto::tls::endpoint(&connection.coordinator, &connection.tls())?;
    let channel = endpoint.connect().await.map_err(|e| {
        let error = twinhead_proto::error_chain(&e);
        let hint = twinhead_proto::tls::hint(&connection.coordinator, &error)
            .map(|h| format!(" ({h})"))
            .unwrap_or_default();
        anyhow::anyhow!(
            "cannot reach the coordinator at {}: {error}{hint}",
            connection.coordinator,
        )
    })?;
    Ok((channel, bearer))
}

pub async fn run_client(connection: &Connection) -> anyhow::Result<RunClient> {
    let (channel, bearer) = channel(connection).await?;
    Ok(RunServiceClient::with_interceptor(channel, bearer))
}

pub async fn dataset_client(connection: &Connection) -> anyhow::Result<DatasetClient> {
    let (channel, bearer) = channel(connection).await?;
    Ok(DatasetServiceClient::with_interceptor(channel, bearer))
}

pub async fn dataprep_client(
    connection: &Connection,
) -> anyhow::Result<twinhead_dataprep::process::DataprepClient> {
    let (channel, bearer) = channel(connection).await?;
    Ok(DataprepServiceClient::with_interceptor(channel, bearer))
}
