//! A Rust client of the simulator's admin API, for tests, demos and benchmarks.

use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use super::admin::{
    DropReport, OutageSwitch, PublishReport, SimulatorStats, TokenGrant, TokenRequest,
};

/// Failures of an admin call.
#[derive(Debug, thiserror::Error)]
pub enum SimulatorClientError {
    /// The base url cannot carry paths.
    #[error("invalid simulator url {0:?}")]
    Url(String),
    /// The request did not complete.
    #[error("request to the simulator failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The simulator answered with an error status.
    #[error("simulator answered {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The error body.
        body: String,
    },
}

/// Calls the admin API of a simulator at a base url such as `http://127.0.0.1:8080`.
#[derive(Clone, Debug)]
pub struct SimulatorClient {
    base: url::Url,
    http: reqwest::Client,
}

impl SimulatorClient {
    /// A client of the simulator at `base_url`.
    pub fn new(base_url: &str) -> Result<SimulatorClient, SimulatorClientError> {
        let base = url::Url::parse(base_url.trim_end_matches('/'))
            .ok()
            .filter(|u| !u.cannot_be_a_base())
            .ok_or_else(|| SimulatorClientError::Url(base_url.to_owned()))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(SimulatorClient { base, http })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base.as_str().trim_end_matches('/'), path)
    }

    async fn checked(
        response: reqwest::Response,
    ) -> Result<reqwest::Response, SimulatorClientError> {
        let status = response.status();
        if status.is_success() {
            Ok(response)
        } else {
            let body = response.text().await.unwrap_or_default();
            Err(SimulatorClientError::Status { status, body })
        }
    }

    async fn json<T: DeserializeOwned>(
        response: reqwest::Response,
    ) -> Result<T, SimulatorClientError> {
        Ok(Self::checked(response).await?.json().await?)
    }

    /// `POST /admin/tokens`
    pub async fn create_token(
        &self,
        request: &TokenRequest,
    ) -> Result<TokenGrant, SimulatorClientError> {
        let response = self
            .http
            .post(self.url("/admin/tokens"))
            .json(request)
            .send()
            .await?;
        Self::json(response).await
    }

    /// `DELETE /admin/tokens/{token}`
    pub async fn revoke_token(&self, token: &str) -> Result<(), SimulatorClientError> {
        let mut url = url::Url::parse(&self.url("/admin/tokens/"))
            .map_err(|_| SimulatorClientError::Url(self.base.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| SimulatorClientError::Url(self.base.to_string()))?
            .pop_if_empty()
            .push(token);
        let response = self.http.delete(url).send().await?;
        Self::checked(response).await.map(drop)
    }

    /// `POST /admin/events` with `{"events": [...]}`: per event, the streams that received it.
    pub async fn publish(
        &self,
        events: &[serde_json::Value],
    ) -> Result<Vec<usize>, SimulatorClientError> {
        let response = self
            .http
            .post(self.url("/admin/events"))
            .json(&serde_json::json!({ "events": events }))
            .send()
            .await?;
        Ok(Self::json::<PublishReport>(response).await?.delivered)
    }

    /// `GET /admin/stats`
    pub async fn stats(&self) -> Result<SimulatorStats, SimulatorClientError> {
        let response = self.http.get(self.url("/admin/stats")).send().await?;
        Self::json(response).await
    }

    /// `POST /admin/streams/drop`: how many streams were dropped.
    pub async fn drop_streams(&self) -> Result<usize, SimulatorClientError> {
        let response = self
            .http
            .post(self.url("/admin/streams/drop"))
            .send()
            .await?;
        Ok(Self::json::<DropReport>(response).await?.dropped)
    }

    /// `PUT /admin/outage`
    pub async fn set_outage(&self, enabled: bool) -> Result<(), SimulatorClientError> {
        let response = self
            .http
            .put(self.url("/admin/outage"))
            .json(&OutageSwitch { enabled })
            .send()
            .await?;
        Self::checked(response).await.map(drop)
    }
}
