//! Per-call metrics of the ledger service: `ledger_grpc_requests_total{method, code}` (the
//! gRPC status code of each answer) and `ledger_grpc_request_seconds{method}` (from the
//! decoded request to the answer, decoding and encoding of the messages excluded).
//!
//! Each method's series for an `OK` answer and its histogram are registered once, when the
//! service is built, so a call records through handles instead of looking its series up by
//! name and labels; other codes (errors) are looked up when they happen. With no Prometheus
//! endpoint configured the handles record nothing.

use std::future::Future;

use futures::FutureExt as _;
use metrics::{Counter, Histogram};
use tonic::{Code, Status};

/// The ledger service's methods, as the `method` label names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    CreateAccounts,
    GetAccounts,
    CreateTransfers,
    Transfer,
    GetTransfers,
    GetBalance,
    ListEntries,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::CreateAccounts,
        Method::GetAccounts,
        Method::CreateTransfers,
        Method::Transfer,
        Method::GetTransfers,
        Method::GetBalance,
        Method::ListEntries,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::CreateAccounts => "CreateAccounts",
            Method::GetAccounts => "GetAccounts",
            Method::CreateTransfers => "CreateTransfers",
            Method::Transfer => "Transfer",
            Method::GetTransfers => "GetTransfers",
            Method::GetBalance => "GetBalance",
            Method::ListEntries => "ListEntries",
        }
    }
}

/// The gRPC name of a status code, as the `code` label shows it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

struct Series {
    ok: Counter,
    seconds: Histogram,
}

/// The registered series of every method.
pub struct Calls {
    series: Vec<Series>,
}

impl Calls {
    pub fn new() -> Self {
        let series = Method::ALL
            .iter()
            .map(|m| Series {
                ok: metrics::counter!("ledger_grpc_requests_total", "method" => m.name(), "code" => "OK"),
                seconds: metrics::histogram!("ledger_grpc_request_seconds", "method" => m.name()),
            })
            .collect();
        Self { series }
    }

    /// Runs a call of `method`, recording its duration and its answer's code, and passes the
    /// answer on. The call is wrapped, not awaited inside another async body: that would hold
    /// it twice over (as the argument and as the awaited future), and a call's future is moved
    /// into a box on every request (docs/benchmarks.md).
    pub fn observe<'a, T, F>(
        &'a self,
        method: Method,
        call: F,
    ) -> impl Future<Output = Result<T, Status>> + Send + 'a
    where
        F: Future<Output = Result<T, Status>> + Send + 'a,
    {
        // `ALL` lists the methods in declaration order.
        let series = &self.series[method as usize];
        let started = stopwatch();
        call.map(move |result| {
            series.seconds.record(started.elapsed().as_secs_f64());
            match &result {
                Ok(_) => series.ok.increment(1),
                Err(status) => metrics::counter!(
                    "ledger_grpc_requests_total",
                    "method" => method.name(),
                    "code" => code_name(status.code())
                )
                .increment(1),
            }
            result
        })
    }
}

impl Default for Calls {
    fn default() -> Self {
        Self::new()
    }
}

/// Measures a call (an adapter at the edge: it may read the monotonic clock).
#[allow(clippy::disallowed_methods)]
fn stopwatch() -> std::time::Instant {
    std::time::Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Calls::start` indexes the series by discriminant: `ALL` must list every method in
    /// declaration order, each once.
    #[test]
    fn every_method_has_its_own_series() {
        for (i, method) in Method::ALL.iter().enumerate() {
            assert_eq!(*method as usize, i, "{method:?}");
        }
        let names: std::collections::BTreeSet<_> = Method::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names.len(), Method::ALL.len());
        assert_eq!(Calls::new().series.len(), Method::ALL.len());
    }

    #[test]
    fn codes_are_named_as_grpc_names_them() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::from_i32(16)), "UNAUTHENTICATED");
    }
}
