//! The handlers a worker serves, by job type name, with their types erased.
//!
//! Typed handlers are wrapped once, at registration, into functions from an `Any` payload to
//! an `Any` result, so the rest of the runtime handles every job type alike. Decoding happens
//! inside the handler's task, so even a panic while decoding is caught like any other.
//!
//! The registry also keeps the worker's retry predicates (one per job type, and one for the
//! rest) and hands each handler its own, so the predicate sees what the handler returned and
//! nothing the SDK made (a payload that did not decode, a result that did not encode).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use prost_types::Any;

use crate::context::JobContext;
use crate::error::HandlerError;
use crate::job::JobType;
use crate::retry::{self, SharedPredicate};

/// A typed handler behind a function from an `Any` payload, with the predicate to apply to its
/// failures, to an `Any` result.
type Erased = Arc<
    dyn Fn(
            JobContext,
            Any,
            Option<SharedPredicate>,
        ) -> BoxFuture<'static, Result<Any, HandlerError>>
        + Send
        + Sync,
>;

/// A handler with its job type erased, and the retry predicate that decides its failures.
#[derive(Clone)]
pub(super) struct ErasedHandler {
    run: Erased,
    predicate: Option<SharedPredicate>,
}

impl ErasedHandler {
    /// A handler that echoes its payload, for tests of the machinery around handlers.
    #[cfg(test)]
    pub(super) fn echo() -> Self {
        Self {
            run: Arc::new(|_, payload, _| Box::pin(std::future::ready(Ok(payload)))),
            predicate: None,
        }
    }

    /// Runs the handler on `payload`.
    pub(super) fn call(
        &self,
        ctx: JobContext,
        payload: Any,
    ) -> BoxFuture<'static, Result<Any, HandlerError>> {
        (self.run)(ctx, payload, self.predicate.clone())
    }
}

/// Handlers by job type name.
#[derive(Default)]
pub(super) struct Registry {
    handlers: HashMap<&'static str, Erased>,
    /// Retry predicates by job type name.
    predicates: HashMap<&'static str, SharedPredicate>,
    /// The retry predicate of job types without one of their own.
    default_predicate: Option<SharedPredicate>,
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
        let erased: Erased = Arc::new(move |ctx, payload: Any, predicate| {
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
                let output = running
                    .await
                    .map_err(|error| retry::apply(predicate.as_ref(), error))?;
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

    /// Decides the failures of job type `job_type` with `predicate`.
    pub(super) fn set_predicate(&mut self, job_type: &'static str, predicate: SharedPredicate) {
        self.predicates.insert(job_type, predicate);
    }

    /// Decides the failures of job types without a predicate of their own with `predicate`.
    pub(super) fn set_default_predicate(&mut self, predicate: SharedPredicate) {
        self.default_predicate = Some(predicate);
    }

    /// The handler of `job_type`, if this worker serves it.
    pub(super) fn get(&self, job_type: &str) -> Option<ErasedHandler> {
        let run = self.handlers.get(job_type)?;
        Some(ErasedHandler {
            run: Arc::clone(run),
            predicate: self
                .predicates
                .get(job_type)
                .or(self.default_predicate.as_ref())
                .cloned(),
        })
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
        let result = handler
            .call(ctx(), payload)
            .await
            .expect("handler succeeds");
        assert_eq!(
            result.to_msg::<Echo>().ok(),
            Some(Echo { text: "hi".into() })
        );
    }

    #[tokio::test]
    async fn a_payload_of_another_type_fails_for_good() {
        let handler = registry().get("test.echo").expect("registered");
        let error = handler
            .call(ctx(), Any::from_msg(&()).expect("encode"))
            .await
            .expect_err("decode fails");
        assert!(!error.is_retryable());
        assert_eq!(error.kind(), Some("payload_decode"));
    }

    #[tokio::test]
    async fn the_predicate_decides_what_the_handler_returned_and_nothing_else() {
        let mut registry = Registry::default();
        assert!(registry.insert::<Echo, _, _>(|_ctx, job: Echo| async move {
            Err(HandlerError::retryable(job.text))
        }));
        registry.set_default_predicate(Arc::new(|error: &HandlerError| {
            (error.message() == "client error")
                .then(|| crate::retry::RetryDecision::fatal().with_kind("http_4xx"))
        }));
        let handler = registry.get("test.echo").expect("registered");
        let run = |text: &str| {
            let payload = Any::from_msg(&Echo { text: text.into() }).expect("encode");
            handler.call(ctx(), payload)
        };
        let decided = run("client error").await.expect_err("fails");
        assert!(!decided.is_retryable());
        assert_eq!(decided.kind(), Some("http_4xx"));
        let kept = run("server error").await.expect_err("fails");
        assert!(kept.is_retryable());
        assert_eq!(kept.kind(), None);
        // A predicate of the type's own replaces the worker's.
        registry.set_predicate(
            "test.echo",
            Arc::new(|_: &HandlerError| Some(crate::retry::RetryDecision::retryable())),
        );
        let handler = registry.get("test.echo").expect("registered");
        let payload = Any::from_msg(&Echo {
            text: "client error".into(),
        })
        .expect("encode");
        let own = handler.call(ctx(), payload).await.expect_err("fails");
        assert!(own.is_retryable());
        // The SDK's own failures are not the handler's to reclassify.
        let undecodable = handler
            .call(ctx(), Any::from_msg(&()).expect("encode"))
            .await
            .expect_err("decode fails");
        assert!(!undecodable.is_retryable());
        assert_eq!(undecodable.kind(), Some("payload_decode"));
    }

    #[test]
    fn a_job_type_is_registered_once() {
        let mut registry = registry();
        assert!(!registry.insert::<Echo, _, _>(|_ctx, job: Echo| async move { Ok(job) }));
        assert_eq!(registry.job_types(), ["test.echo"]);
        assert!(registry.get("test.other").is_none());
    }
}
