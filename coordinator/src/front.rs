//! The coordinator's Flight front door: the Flight SQL service, with each
//! `DoGet` ticket checked before arrow-flight decodes it, so that a ticket
//! this coordinator did not issue gets a message that says what to send,
//! not a protobuf decode error.

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::{Any, Command};
use arrow_flight::{
    Action, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, PollInfo,
    SchemaResult, Ticket,
};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::service::CoordinatorService;

/// [`CoordinatorService`] behind a check of every ticket.
pub struct Front(pub CoordinatorService);

type Inner = CoordinatorService;

/// Whether `bytes` is a Flight SQL command this coordinator serves through
/// `DoGet`; the refusal says what a client should send instead.
pub fn check_ticket(bytes: &[u8]) -> Result<(), Status> {
    let any = Any::decode(bytes).map_err(|_| {
        Status::invalid_argument(
            "the ticket is not one this coordinator issued: send the ticket that GetFlightInfo \
             returned for your statement (a Flight SQL client does this for you)",
        )
    })?;
    match Command::try_from(any) {
        Ok(Command::Unknown(any)) => Err(Status::invalid_argument(format!(
            "this coordinator does not serve tickets of type {:?}: send the ticket that GetFlightInfo \
             returned for your statement",
            any.type_url
        ))),
        Ok(_) => Ok(()),
        Err(_) => Err(Status::invalid_argument(
            "the ticket names a Flight SQL command whose body does not decode: send the ticket \
             that GetFlightInfo returned for your statement",
        )),
    }
}

#[tonic::async_trait]
impl FlightService for Front {
    type HandshakeStream = <Inner as FlightService>::HandshakeStream;
    type ListFlightsStream = <Inner as FlightService>::ListFlightsStream;
    type DoGetStream = <Inner as FlightService>::DoGetStream;
    type DoPutStream = <Inner as FlightService>::DoPutStream;
    type DoExchangeStream = <Inner as FlightService>::DoExchangeStream;
    type DoActionStream = <Inner as FlightService>::DoActionStream;
    type ListActionsStream = <Inner as FlightService>::ListActionsStream;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        self.0.handshake(request).await
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.0.list_flights(request).await
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.0.get_flight_info(request).await
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        self.0.poll_flight_info(request).await
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.0.get_schema(request).await
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        check_ticket(&request.get_ref().ticket)?;
        self.0.do_get(request).await
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        self.0.do_put(request).await
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.0.do_exchange(request).await
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        self.0.do_action(request).await
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.0.list_actions(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};

    #[test]
    fn tickets_not_issued_here_are_refused_with_what_to_send() {
        for garbage in [&b"not a ticket"[..], &[0xff, 0xff, 0xff][..]] {
            let err = check_ticket(garbage).expect_err("garbage");
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().contains("GetFlightInfo"), "{}", err.message());
        }
        let other = Any {
            type_url: "type.example.com/Other".into(),
            value: vec![1, 2, 3].into(),
        };
        let err = check_ticket(&other.encode_to_vec()).expect_err("unknown type");
        assert!(
            err.message().contains("type.example.com/Other"),
            "{}",
            err.message()
        );
        let ticket = TicketStatementQuery {
            statement_handle: b"handle".to_vec().into(),
        };
        check_ticket(&ticket.as_any().encode_to_vec()).expect("a statement ticket");
    }
}
