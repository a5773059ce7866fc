//! The handlers a worker serves, by job type name, with their types erased.
//!
//! Typed handlers are wrapped once, at registration, into functions from an `Any` payload to
//! an `Any` result, so the rest of the runtime handles every job type alike. Decoding happens
//! inside the handler's task, so even a panic while decoding is caught like any other.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use prost_types::Any;

use crate::context::JobContext;
use crate::error::HandlerError;
use crate::job::JobType;

/// A handler with its job type erased.
pub(super) type ErasedHandler =
    Arc<dyn Fn(JobContext, Any) -> BoxFuture<'static, Result<Any, HandlerError>> + Send + Sync>;

/// Handlers by job type name.
#[derive(Default)]
pub(super) struct Registry {
    handlers: HashMap<&'static str, ErasedHandler>,
    /// The schemas of the types that have one, registered with the server on connect.
    schemas: HashMap<&'static str, crate::job::JobSchema>,
}

impl Registry {
    /// Adds the handler of `J`; returns false when its job type already has one.
    pub(super) fn insert<J, F, Fut>(&mut self, handler: F) -> bool
    where
        J: JobType,
        F: Fn(JobContext, J) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<J::Output, HandlerError>> + Send + 'static,
    {
        if self.handlers.contains_key(J::JOB_TYPE) {
            return false;
        }
        let erased: ErasedHandler = Arc::new(move |ctx, payload: Any| {
            // A payload that does not decode will not decode on a retry either.
            let job = match payload.to_msg::<J>() {
                Ok(job) => job,
                Err(err) => {
                    let error = HandlerError::fatal(format!(
                        "the payload is not a {}: {err}",
                        <J as prost::Name>::full_name()
                    ))
                    .with_kind("payload_decode");
                    return Box::pin(std::future::ready(Err(error)));
                }
            };
            let running = handler(ctx, job);
            Box::pin(async move {
                let output = running.await?;
                crate::job::encode(&output, "job result").map_err(|err| {
                    HandlerError::fatal(format!("the result could not be encoded: {err}"))
                        .with_kind("result_encode")
                })
            })
        });
        self.handlers.insert(J::JOB_TYPE, erased);
        if let Some(schema) = J::SCHEMA {
            self.schemas.insert(J::JOB_TYPE, schema);
        }
        true
    }

    /// The registrations of the types with a schema, sorted like [`job_types`](Self::job_types).
    pub(super) fn schemas(&self) -> Vec<crate::proto::v1::JobType> {
        let mut out: Vec<_> = self
            .schemas
            .iter()
            .map(|(name, schema)| schema.to_proto(name))
            .collect();
        out.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The handler of `job_type`, if this worker serves it.
    pub(super) fn get(&self, job_type: &str) -> Option<ErasedHandler> {
        self.handlers.get(job_type).cloned()
    }

    /// Every job type served, sorted so the `Hello` is stable across reconnects.
    pub(super) fn job_types(&self) -> Vec<String> {
        let mut names: Vec<String> = self.handlers.keys().map(|&name| name.to_owned()).collect();
        names.sort_unstable();
        names
    }

    pub(super) fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::StopSignal;
    use crate::proto::v1 as pb;
    use crate::worker::reports::Links;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Echo {
        #[prost(string, tag = "1")]
        text: String,
    }

    impl prost::Name for Echo {
        const NAME: &'static str = "Echo";
        const PACKAGE: &'static str = "jobwire.test";
    }

    impl JobType for Echo {
        const JOB_TYPE: &'static str = "test.echo";
        type Output = Echo;
    }

    fn ctx() -> JobContext {
        let (links, _hub, _checkpoints) = Links::new();
        let reports = links.attach(pb::LeaseRef::default());
        JobContext::new(
            &pb::Lease::default(),
            Arc::from("w"),
            StopSignal::default(),
            reports,
        )
    }

    fn registry() -> Registry {
        let mut registry = Registry::default();
        assert!(registry.insert::<Echo, _, _>(|_ctx, job: Echo| async move { Ok(job) }));
        registry
    }

    #[tokio::test]
    async fn typed_handlers_run_on_any_payloads() {
        let handler = registry().get("test.echo").expect("registered");
        let payload = Any::from_msg(&Echo { text: "hi".into() }).expect("encode");
        let result = handler(ctx(), payload).await.expect("handler succeeds");
        assert_eq!(
            result.to_msg::<Echo>().ok(),
            Some(Echo { text: "hi".into() })
        );
    }

    #[tokio::test]
    async fn a_payload_of_another_type_fails_for_good() {
        let handler = registry().get("test.echo").expect("registered");
        let error = handler(ctx(), Any::from_msg(&()).expect("encode"))
            .await
            .expect_err("decode fails");
        assert!(!error.is_retryable());
        assert_eq!(error.kind(), Some("payload_decode"));
    }

    #[test]
    fn a_job_type_is_registered_once() {
        let mut registry = registry();
        assert!(!registry.insert::<Echo, _, _>(|_ctx, job: Echo| async move { Ok(job) }));
        assert_eq!(registry.job_types(), ["test.echo"]);
        assert!(registry.get("test.other").is_none());
    }
}
