//! The `hello.Greeter` service: one unary RPC, `SayHello`, whose reply names the instance
//! that answered. The messages derive `prost::Message` (tags as a `.proto` would give them);
//! the server routes by path as tonic's generated code does, the client calls by path.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tonic::{
    body::Body,
    codegen::http,
    server::{NamedService, UnaryService},
};

/// The service's full name, as a `.proto`'s `package hello; service Greeter` names it.
pub const SERVICE: &str = "hello.Greeter";
/// The path of `SayHello`.
pub const SAY_HELLO: &str = "/hello.Greeter/SayHello";

/// `message HelloRequest { string name = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// Who to greet.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `message HelloReply { string message = 1; string instance = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    /// `hello <name>`.
    #[prost(string, tag = "1")]
    pub message: String,
    /// The ID of the instance that answered.
    #[prost(string, tag = "2")]
    pub instance: String,
}

/// The server half: answers `SayHello` as instance `id`; any other method of the service is
/// `UNIMPLEMENTED`.
#[derive(Debug, Clone)]
pub struct GreeterServer {
    id: Arc<str>,
}

impl GreeterServer {
    /// A greeter that answers as instance `id`.
    pub fn new(id: &str) -> GreeterServer {
        GreeterServer { id: id.into() }
    }
}

impl NamedService for GreeterServer {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<Body>> for GreeterServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != SAY_HELLO {
            let method = request.uri().path().to_owned();
            return Box::pin(async move {
                Ok(tonic::Status::unimplemented(format!("no method {method}")).into_http())
            });
        }
        let say_hello = SayHello(self.id.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(say_hello, request).await)
        })
    }
}

/// `SayHello` itself.
struct SayHello(Arc<str>);

impl UnaryService<HelloRequest> for SayHello {
    type Response = HelloReply;
    type Future = std::future::Ready<Result<tonic::Response<HelloReply>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<HelloRequest>) -> Self::Future {
        let name = request.into_inner().name;
        std::future::ready(Ok(tonic::Response::new(HelloReply {
            message: format!("hello {name}"),
            instance: self.0.to_string(),
        })))
    }
}
