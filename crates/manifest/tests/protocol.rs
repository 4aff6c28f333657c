//! `protocol` of a service: how the proxies talk to its instances.

mod common;
use common::*;

use flotilla_manifest::Protocol;

fn service(protocol_line: &str) -> String {
    format!(
        "app = \"a\"\n[services.recommendations]\nrun = \"./recommendations\"\n{protocol_line}\n"
    )
}

#[test]
fn http_is_the_default() {
    let manifest = ok(&service(""));
    assert_eq!(manifest.services[0].protocol, Protocol::Http);
}

#[test]
fn grpc_and_http_are_read() {
    let manifest = ok(&service("protocol = \"grpc\""));
    let recommendations = &manifest.services[0];
    assert_eq!(recommendations.protocol, Protocol::Grpc);
    // A gRPC service is probed like any other: it serves /healthz over HTTP/1.1 as well.
    assert_eq!(recommendations.health.path, "/healthz");

    assert_eq!(
        ok(&service("protocol = \"http\"")).services[0].protocol,
        Protocol::Http
    );
}

#[test]
fn inline_tables_take_it_too() {
    let manifest = ok(
        "app = \"a\"\nservices.recs = { run = \"./recs\", protocol = \"grpc\" }\nservices.web = { run = \"./web\" }\n",
    );
    let protocols: Vec<_> = manifest.services.iter().map(|s| s.protocol).collect();
    assert_eq!(protocols, [Protocol::Grpc, Protocol::Http]);
}

#[test]
fn unknown_protocol_suggests_the_closest_and_lists_the_choices() {
    let error = single_error(
        &service("protocol = \"gprc\""),
        4,
        12,
        "unknown protocol \"gprc\"",
    );
    let help = error.help.as_deref().unwrap_or("");
    assert!(help.starts_with("did you mean `grpc`?"), "{help}");
    assert!(help.contains("http") && help.contains("grpc"), "{help}");

    let error = single_error(
        &service("protocol = \"websocket\""),
        4,
        12,
        "unknown protocol \"websocket\"",
    );
    let help = error.help.as_deref().unwrap_or("");
    assert!(help.starts_with("`protocol` is one of: http"), "{help}");
}

#[test]
fn h2_is_not_a_protocol_of_its_own() {
    // gRPC is what gets HTTP/2; a plain HTTP service is called over HTTP/1.1.
    let error = single_error(
        &service("protocol = \"h2c\""),
        4,
        12,
        "unknown protocol \"h2c\"",
    );
    assert!(error.help.as_deref().unwrap_or("").contains("grpc"));
}

#[test]
fn protocol_must_be_a_string() {
    let error = single_error(
        &service("protocol = 2"),
        4,
        12,
        "`protocol` must be a string, found an integer",
    );
    assert_eq!(
        error.help.as_deref(),
        Some("write it like `protocol = \"grpc\"`; the choices are: http, grpc")
    );
}

#[test]
fn misspelt_key_is_suggested() {
    let error = single_error(
        &service("protocl = \"grpc\""),
        4,
        1,
        "unknown key `protocl` in [services.recommendations]",
    );
    assert!(
        error
            .help
            .as_deref()
            .unwrap_or("")
            .contains("did you mean `protocol`?"),
        "{error}"
    );
}
