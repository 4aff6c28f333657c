//! `protocol` of a `[services.NAME]`: how the proxies talk to the service's instances.

use super::{Checker, Value};
use crate::model::Protocol;
use crate::suggest::closest;

const CHOICES: [Protocol; 2] = [Protocol::Http, Protocol::Grpc];

impl Protocol {
    /// The manifest's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

impl Checker<'_> {
    /// `protocol = "http" | "grpc"`; the default on any error, which is reported.
    pub(super) fn protocol(&mut self, value: &Value<'_>) -> Protocol {
        let names = CHOICES.map(Protocol::as_str);
        let list = names.join(", ");
        let Some(text) = self.string_with_help(
            value,
            "protocol",
            "a string",
            &format!("write it like `protocol = \"grpc\"`; the choices are: {list}"),
        ) else {
            return Protocol::default();
        };
        if let Some(protocol) = CHOICES.into_iter().find(|c| c.as_str() == text) {
            return protocol;
        }
        let what = "`protocol` is one of: http (HTTP/1.1, the default), grpc (gRPC over HTTP/2 \
                    without TLS)";
        let help = match closest(text, names) {
            Some(guess) => format!("did you mean `{guess}`? {what}"),
            None => what.to_owned(),
        };
        self.error(
            &value.span(),
            format!("unknown protocol {text:?}"),
            Some(help),
        );
        Protocol::default()
    }
}
