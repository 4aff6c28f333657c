//! `[gateway.auth.NAME]` and a route's `auth`/`scopes`: what valid tables turn into, and where
//! and how every mistake is reported.

mod common;
use common::{errors, ok};

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_manifest::{
    ApiKey, AuthKind, Authenticator, Diagnostic, Diagnostics, JwtAlgorithm, JwtKeys, RouteAuth,
};

/// The 1-based line and column of the first `needle` in `source`.
fn position(source: &str, needle: &str) -> (usize, usize) {
    let offset = source
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in the source"));
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// The one error of `source`, checked to be at the first `at` with `message`; returns its help.
#[track_caller]
fn single_error(source: &str, at: &str, message: &str) -> String {
    let found = errors(source);
    assert_eq!(
        found.len(),
        1,
        "expected one error, got:\n{}",
        Diagnostics(found)
    );
    let error = found.into_iter().next().expect("one error");
    let (line, column) = position(source, at);
    assert_eq!(
        (error.line, error.column, error.message.as_str()),
        (line, column, message),
        "\n{error}"
    );
    assert_eq!(error.file, Path::new("flotilla.toml"));
    error.help.unwrap_or_default()
}

const SERVICES: &str = r#"app = "shop"

[services.orders]
run = "orders"
"#;

/// A manifest with `gateway` after the services.
fn manifest(gateway: &str) -> String {
    format!("{SERVICES}\n{gateway}")
}

const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

#[test]
fn every_kind_of_authenticator_and_route_auth() {
    let source = manifest(&format!(
        r#"
[gateway.auth.users]
jwks = "https://id.example/.well-known/jwks.json"
refresh = "10m"
issuer = "https://id.example/"
audience = ["shop", "shop-admin"]
algorithms = ["RS256", "ES256", "PS256"]
leeway = "10s"
claims = {{ "x-tenant" = "tenant", "x-user-email" = "email" }}

[gateway.auth.internal]
secret_env = "SHOP_JWT_SECRET"
issuer = "shop"
audience = "orders"

[gateway.auth.local-dev]
jwks = "keys/jwks.json"

[gateway.auth.partners]
keys = [ {{ name = "acme", sha256 = "{DIGEST}", scopes = ["orders:read"] }} ]

[gateway.auth.vendors]
header = "x-vendor-key"

[[gateway.auth.vendors.keys]]
name = "globex"
sha256 = "{}"

[[gateway.routes]]
prefix = "/api/orders"
service = "orders"
auth = ["users", "partners"]
scopes = ["orders:write", "orders:read"]

[[gateway.routes]]
prefix = "/internal"
service = "orders"
auth = "internal"

[[gateway.routes]]
prefix = "/"
service = "orders"
"#,
        DIGEST.to_uppercase()
    ));
    let manifest = ok(&source);
    let auth = &manifest.gateway.auth;
    let names: Vec<&str> = auth.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        ["users", "internal", "local-dev", "partners", "vendors"]
    );

    let jwt = |authenticator: &Authenticator| match &authenticator.kind {
        AuthKind::Jwt(settings) => settings.clone(),
        other => panic!("expected a JWT authenticator, got {other:?}"),
    };
    let users = jwt(&auth[0]);
    assert_eq!(
        users.keys,
        JwtKeys::JwksUrl {
            url: "https://id.example/.well-known/jwks.json".into(),
            refresh: Duration::from_secs(600),
        }
    );
    assert_eq!(users.issuer.as_deref(), Some("https://id.example/"));
    assert_eq!(users.audience, ["shop", "shop-admin"]);
    assert_eq!(
        users.algorithms,
        [
            JwtAlgorithm::Rs256,
            JwtAlgorithm::Es256,
            JwtAlgorithm::Ps256
        ]
    );
    assert_eq!(users.leeway, Duration::from_secs(10));
    assert_eq!(
        users.forward_claims,
        [
            ("x-tenant".to_owned(), "tenant".to_owned()),
            ("x-user-email".to_owned(), "email".to_owned())
        ]
    );

    let internal = jwt(&auth[1]);
    assert_eq!(
        internal.keys,
        JwtKeys::SecretEnv {
            variable: "SHOP_JWT_SECRET".into()
        }
    );
    assert_eq!(
        internal.algorithms,
        [JwtAlgorithm::Hs256],
        "the default for a secret"
    );
    assert_eq!(internal.audience, ["orders"]);
    assert_eq!(
        internal.leeway,
        Duration::from_secs(30),
        "the default leeway"
    );

    let local = jwt(&auth[2]);
    assert_eq!(
        local.keys,
        JwtKeys::JwksFile {
            path: PathBuf::from("keys/jwks.json"),
            refresh: Duration::from_secs(300),
        }
    );
    assert_eq!(
        local.algorithms,
        [
            JwtAlgorithm::Rs256,
            JwtAlgorithm::Es256,
            JwtAlgorithm::EdDsa
        ],
        "the default for a JWKS"
    );

    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&DIGEST[2 * i..2 * i + 2], 16).expect("hex");
    }
    match &auth[3].kind {
        AuthKind::ApiKeys(settings) => {
            assert_eq!(settings.header, "x-api-key", "the default header");
            assert_eq!(
                settings.keys,
                [ApiKey {
                    name: "acme".into(),
                    sha256: digest,
                    scopes: vec!["orders:read".into()],
                }]
            );
        }
        other => panic!("expected API keys, got {other:?}"),
    }
    match &auth[4].kind {
        AuthKind::ApiKeys(settings) => {
            assert_eq!(settings.header, "x-vendor-key");
            assert_eq!(settings.keys[0].name, "globex");
            assert_eq!(
                settings.keys[0].sha256, digest,
                "upper-case hex is read too"
            );
            assert!(settings.keys[0].scopes.is_empty());
        }
        other => panic!("expected API keys, got {other:?}"),
    }

    let route = |prefix: &str| {
        manifest
            .gateway
            .routes
            .iter()
            .find(|r| r.prefix == prefix)
            .expect("route")
            .auth
            .clone()
    };
    assert_eq!(
        route("/api/orders"),
        Some(RouteAuth {
            authenticators: vec!["users".into(), "partners".into()],
            scopes: vec!["orders:write".into(), "orders:read".into()],
        })
    );
    assert_eq!(
        route("/internal"),
        Some(RouteAuth {
            authenticators: vec!["internal".into()],
            scopes: Vec::new(),
        })
    );
    assert_eq!(route("/"), None);
}

#[test]
fn a_route_naming_an_unknown_authenticator_gets_the_closest() {
    let source = manifest(
        r#"
[gateway.auth.users]
jwks = "keys.json"

[gateway.auth.partners]
keys = [{ name = "acme", sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" }]

[[gateway.routes]]
prefix = "/api"
service = "orders"
auth = ["partners", "user"]
"#,
    );
    let help = single_error(
        &source,
        "\"user\"]",
        "unknown authenticator `user` in [[gateway.routes]]",
    );
    assert_eq!(
        help,
        "did you mean `users`? declared authenticators are: users, partners"
    );

    let source = manifest(
        r#"
[[gateway.routes]]
prefix = "/api"
service = "orders"
auth = "users"
"#,
    );
    let help = single_error(
        &source,
        "\"users\"",
        "unknown authenticator `users` in [[gateway.routes]]",
    );
    assert!(help.contains("no authenticators are declared; add a [gateway.auth.NAME] section"));
}

#[test]
fn route_auth_and_scopes_are_checked() {
    let with_users = |route: &str| {
        manifest(&format!(
            "[gateway.auth.users]\njwks = \"keys.json\"\n\n[[gateway.routes]]\nprefix = \"/api\"\nservice = \"orders\"\n{route}\n"
        ))
    };
    let source = with_users("scopes = [\"orders:read\"]");
    let help = single_error(
        &source,
        "[\"orders:read\"]",
        "`scopes` without `auth` in [[gateway.routes]]",
    );
    assert!(help.contains("add `auth = \"NAME\"`"), "{help}");

    let source = with_users("auth = 7");
    single_error(
        &source,
        "7",
        "`auth` must be a string or a list of strings, found an integer",
    );

    let source = with_users("auth = []");
    single_error(
        &source,
        "[]",
        "`auth` must not be an empty list in [[gateway.routes]]",
    );

    let source = with_users("auth = [\"users\", \"users\"]");
    single_error(
        &source,
        "\"users\"]",
        "authenticator `users` is listed twice in `auth`",
    );

    let source = with_users("auth = \"users\"\nscopes = [\"orders write\"]");
    let help = single_error(
        &source,
        "\"orders write\"",
        "invalid scope \"orders write\": it contains a space, a quote, a backslash or a non-ASCII character",
    );
    assert!(help.contains("one word"), "{help}");

    let source = with_users("auth = \"users\"\nscopes = \"orders:read\"");
    single_error(
        &source,
        "\"orders:read\"",
        "`scopes` must be a list of strings, found a string",
    );
}

#[test]
fn api_key_digests_must_be_64_hex_digits() {
    let keys = |digest: &str| {
        manifest(&format!(
            "[gateway.auth.partners]\nkeys = [{{ name = \"acme\", sha256 = \"{digest}\" }}]\n"
        ))
    };
    let bad_hex = format!("{}zz", &DIGEST[..62]);
    let help = single_error(
        &keys(&bad_hex),
        &format!("\"{bad_hex}\""),
        "invalid `sha256`: it contains characters that are not hexadecimal digits",
    );
    assert!(help.contains("flotilla hash-key KEY"), "{help}");

    let short = &DIGEST[..40];
    single_error(
        &keys(short),
        &format!("\"{short}\""),
        "invalid `sha256`: a SHA-256 digest is 64 hexadecimal digits, this one has 40",
    );

    let source = manifest("[gateway.auth.partners]\nkeys = [{ name = \"acme\" }]\n");
    single_error(
        &source,
        "{ name",
        "missing required key `sha256` in [[gateway.auth.partners.keys]]",
    );

    let source = manifest(&format!(
        "[gateway.auth.partners]\nkeys = [\n  {{ name = \"acme\", sha256 = \"{DIGEST}\" }},\n  {{ name = \"acme\", sha256 = \"{}\" }},\n  {{ name = \"globex\", sha256 = \"{DIGEST}\" }},\n]\n",
        "0".repeat(64)
    ));
    let found = errors(&source);
    let messages: Vec<&str> = found.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "API key name `acme` is used twice",
            "this key is already listed for `acme`"
        ]
    );
    assert_eq!((found[0].line, found[1].line), (9, 10));

    let source = manifest("[gateway.auth.partners]\nkeys = []\n");
    single_error(&source, "[]", "authenticator `partners` has no keys");

    let source = manifest(&format!(
        "[gateway.auth.partners]\nkeys = [{{ name = \"a b\", sha256 = \"{DIGEST}\", scope = [] }}]\n"
    ));
    let found = errors(&source);
    let messages: Vec<&str> = found.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "invalid API key name \"a b\"",
            "unknown key `scope` in [[gateway.auth.partners.keys]]"
        ]
    );
    assert!(help_of(&found[1]).starts_with("did you mean `scopes`?"));
}

fn help_of(error: &Diagnostic) -> &str {
    error.help.as_deref().unwrap_or("")
}

fn jwks_users(extra: &str) -> String {
    manifest(&format!(
        "[gateway.auth.users]\njwks = \"https://id.example/jwks.json\"\n{extra}\n"
    ))
}

fn secret_users(extra: &str) -> String {
    manifest(&format!(
        "[gateway.auth.internal]\nsecret_env = \"SHOP_JWT_SECRET\"\n{extra}\n"
    ))
}

#[test]
fn algorithms_must_be_known_signing_algorithms_of_the_right_family() {
    let help = single_error(
        &jwks_users("algorithms = [\"RS256\", \"RS255\"]"),
        "\"RS255\"",
        "unknown JWT algorithm \"RS255\"",
    );
    assert_eq!(
        help,
        "did you mean `RS256`? valid algorithms are: HS256, HS384, HS512, RS256, RS384, RS512, \
         PS256, ES256, ES384, EdDSA"
    );

    let help = single_error(
        &jwks_users("algorithms = [\"none\"]"),
        "\"none\"",
        "the JWT algorithm `none` is never accepted",
    );
    assert!(
        help.contains("carries no signature, so anyone could write one"),
        "{help}"
    );

    let help = single_error(
        &jwks_users("algorithms = [\"RS256\", \"HS256\"]"),
        "\"HS256\"",
        "`HS256` cannot be used with `jwks`",
    );
    assert!(help.contains("algorithm confusion"), "{help}");
    assert!(help.contains("secret_env"), "{help}");

    let help = single_error(
        &secret_users("algorithms = [\"HS512\", \"RS256\"]"),
        "\"RS256\"",
        "`RS256` cannot be used with `secret_env`",
    );
    assert!(help.contains("need `jwks`"), "{help}");

    single_error(
        &jwks_users("algorithms = [\"ES256\", \"ES256\"]"),
        "\"ES256\"]",
        "`ES256` is listed twice in `algorithms`",
    );
    single_error(
        &jwks_users("algorithms = []"),
        "[]",
        "`algorithms` must not be an empty list",
    );
    single_error(
        &jwks_users("algorithms = \"RS256\""),
        "\"RS256\"",
        "`algorithms` must be a list of strings, found a string",
    );
}

#[test]
fn an_authenticator_is_of_exactly_one_kind() {
    let source = manifest(&format!(
        "[gateway.auth.users]\njwks = \"keys.json\"\nkeys = [{{ name = \"a\", sha256 = \"{DIGEST}\" }}]\n"
    ));
    let help = single_error(
        &source,
        "[{",
        "authenticator `users` mixes JWT keys (`jwks`) and API keys (`keys`)",
    );
    assert!(help.contains("[gateway.auth.users-keys]"), "{help}");

    let source = manifest("[gateway.auth.users]\njwks = \"keys.json\"\nsecret_env = \"SECRET\"\n");
    single_error(
        &source,
        "\"SECRET\"",
        "authenticator `users` sets both `jwks` and `secret_env`",
    );

    let source = manifest("[gateway.auth.users]\nissuer = \"https://id.example/\"\n");
    // The table's name inside its header.
    let help = single_error(
        &source,
        "users]",
        "authenticator `users` says nothing about how to check credentials",
    );
    assert!(help.contains("jwks") && help.contains("keys"), "{help}");

    let help = single_error(
        &jwks_users("header = \"x-api-key\""),
        "header",
        "`header` is a setting of API-key authenticators, and [gateway.auth.users] verifies JWTs",
    );
    assert!(help.starts_with("remove it"), "{help}");

    let source = manifest(&format!(
        "[gateway.auth.partners]\nkeys = [{{ name = \"a\", sha256 = \"{DIGEST}\" }}]\nissuer = \"x\"\n"
    ));
    single_error(
        &source,
        "issuer",
        "`issuer` is a setting of JWT authenticators, and [gateway.auth.partners] checks API keys",
    );

    let help = single_error(
        &jwks_users("isuer = \"x\""),
        "isuer",
        "unknown key `isuer` in [gateway.auth.users]",
    );
    assert!(help.starts_with("did you mean `issuer`?"), "{help}");

    let source = manifest("[gateway.auth.Users]\njwks = \"keys.json\"\n");
    single_error(
        &source,
        "Users",
        "invalid authenticator name \"Users\": only lower-case letters, digits, `-` and `_` are allowed",
    );

    let source = manifest("[gateway]\nauth = \"users\"\n");
    single_error(
        &source,
        "\"users\"",
        "`auth` must be a table of authenticators, found a string",
    );

    let source = manifest("[gateway.auth]\nusers = \"https://id.example/jwks.json\"\n");
    single_error(
        &source,
        "\"https",
        "authenticator `users` must be a table, found a string",
    );
}

#[test]
fn jwt_settings_are_checked() {
    let help = single_error(
        &secret_users("").replace("SHOP_JWT_SECRET", "shop-jwt-secret"),
        "\"shop-jwt-secret\"",
        "invalid environment variable name \"shop-jwt-secret\": only letters, digits and `_` are allowed",
    );
    assert!(help.contains("never goes in the manifest"), "{help}");
    single_error(
        &secret_users("").replace("SHOP_JWT_SECRET", "1SECRET"),
        "\"1SECRET\"",
        "invalid environment variable name \"1SECRET\": it starts with a digit",
    );

    single_error(
        &jwks_users("audience = [\"shop\", \"\"]"),
        "\"\"]",
        "invalid `audience` \"\": it is empty",
    );
    single_error(
        &jwks_users("audience = []"),
        "[]",
        "`audience` must not be an empty list",
    );
    single_error(
        &jwks_users("audience = 3"),
        "3",
        "`audience` must be a string or a list of strings, found an integer",
    );
    single_error(
        &jwks_users("issuer = \" https://id.example/\""),
        "\" https",
        "invalid `issuer` \" https://id.example/\": it starts or ends with whitespace, which no token's claim would",
    );

    let help = single_error(
        &jwks_users("leeway = \"10m\""),
        "\"10m\"",
        "`leeway` must be at most 5m, found 10m",
    );
    assert!(help.contains("keeps expired tokens valid"), "{help}");
    single_error(
        &jwks_users("leeway = \"soon\""),
        "\"soon\"",
        "invalid duration \"soon\" for `leeway`: expected number at 0",
    );
    single_error(
        &secret_users("refresh = \"1m\""),
        "\"1m\"",
        "`refresh` does not apply to `secret_env` in [gateway.auth.internal]",
    );
    single_error(
        &jwks_users("refresh = \"100ms\""),
        "\"100ms\"",
        "`refresh` must be at least 1s",
    );

    let source = manifest("[gateway.auth.users]\njwks = \"ftp://id.example/jwks.json\"\n");
    single_error(
        &source,
        "\"ftp",
        "invalid JWKS URL \"ftp://id.example/jwks.json\": `ftp://` URLs are not supported",
    );
    let source = manifest("[gateway.auth.users]\njwks = \"https:///jwks.json\"\n");
    single_error(
        &source,
        "\"https",
        "invalid JWKS URL \"https:///jwks.json\": the URL names no host",
    );
}

#[test]
fn forwarded_claims_need_headers_of_their_own() {
    single_error(
        &jwks_users("claims = { \"x-flotilla-subject\" = \"sub\" }"),
        "\"x-flotilla-subject\"",
        "a claim cannot be forwarded as `x-flotilla-subject`",
    );
    single_error(
        &jwks_users("claims = { authorization = \"sub\" }"),
        "authorization",
        "a claim cannot be forwarded as `authorization`",
    );
    single_error(
        &jwks_users("claims = { \"X-Tenant\" = \"tenant\" }"),
        "\"X-Tenant\"",
        "invalid header name \"X-Tenant\" in the claims of `users`: write header names in lower case, like \"x-tenant\"",
    );
    single_error(
        &jwks_users("claims = { \"x tenant\" = \"tenant\" }"),
        "\"x tenant\"",
        "invalid header name \"x tenant\" in the claims of `users`: a header name is one word of letters, digits and `-`",
    );
    single_error(
        &jwks_users("claims = { \"x-tenant\" = 1 }"),
        "1 }",
        "`x-tenant` must be a claim name, found an integer",
    );

    let source = manifest(&format!(
        "[gateway.auth.partners]\nheader = \"authorization\"\nkeys = [{{ name = \"a\", sha256 = \"{DIGEST}\" }}]\n"
    ));
    single_error(
        &source,
        "\"authorization\"",
        "API keys cannot be read from `authorization`",
    );
}
