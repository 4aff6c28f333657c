//! OTLP in and out: what senders send decoded, what collectors receive encoded, and the exporter
//! against real sockets on 127.0.0.1.

// In a module so that `cargo test -p flotilla-telemetry otlp` selects these tests.
mod otlp {
    use std::borrow::Cow;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use bytes::Bytes;
    use flotilla_telemetry::otlp::{
        Encoding, ExportConfig, ExportStats, MAX_ATTRIBUTES, MAX_TEXT, OtlpExporter, Signal,
        decode_logs, decode_traces, encode_failure, encode_logs, encode_success, encode_traces,
    };
    use flotilla_telemetry::{
        AttributeValue, HttpHop, Level, LogRecord, Span, SpanId, SpanKind, SpanStatus, Stream,
        TraceId,
    };
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use prost::Message;
    use serde_json::json;

    const TRACE: &str = "5b8efff798038103d269b633813fc60c";

    fn at(nanos: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(nanos)
    }

    /// An OTLP/JSON trace request the way the OTLP specification shows them: upper-case hex ids,
    /// times as strings (and, in the second span, as numbers), integer kind, `intValue` as a string.
    const SPEC_TRACES: &str = r#"{
  "resourceSpans": [{
    "resource": {"attributes": [
      {"key": "service.name", "value": {"stringValue": "checkout"}},
      {"key": "service.instance.id", "value": {"stringValue": "checkout-2"}}
    ]},
    "scopeSpans": [{
      "scope": {"name": "my.library", "version": "1.0.0",
                "attributes": [{"key": "my.scope.attribute", "value": {"stringValue": "x"}}]},
      "spans": [{
        "traceId": "5B8EFFF798038103D269B633813FC60C",
        "spanId": "EEE19B7EC3C1B174",
        "parentSpanId": "EEE19B7EC3C1B173",
        "name": "GET /cart",
        "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": "1544712661000000000",
        "kind": 2,
        "attributes": [
          {"key": "http.request.method", "value": {"stringValue": "GET"}},
          {"key": "url.path", "value": {"stringValue": "/cart"}},
          {"key": "http.response.status_code", "value": {"intValue": "503"}},
          {"key": "my.span.attr", "value": {"stringValue": "some value"}},
          {"key": "retries", "value": {"intValue": 2}},
          {"key": "ratio", "value": {"doubleValue": 0.5}},
          {"key": "cached", "value": {"boolValue": true}},
          {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"intValue": "1"}]}}},
          {"key": "raw", "value": {"bytesValue": "aGk="}}
        ],
        "events": [{"timeUnixNano": "1544712660500000000", "name": "retry"}],
        "status": {"code": 2, "message": "upstream unavailable"},
        "unknownField": {"is": "ignored"}
      }, {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b175",
        "parentSpanId": "",
        "name": "POST",
        "startTimeUnixNano": 1544712660100000000,
        "endTimeUnixNano": 1544712660200000000,
        "attributes": [
          {"key": "http.target", "value": {"stringValue": "/orders?id=7"}},
          {"key": "http.status_code", "value": {"intValue": 201}},
          {"key": "http.method", "value": {"stringValue": "POST"}},
          {"key": "peer.service", "value": {"stringValue": "payments"}},
          {"key": "flotilla.retry.attempts", "value": {"stringValue": "2"}},
          {"key": "flotilla.breaker.state", "value": {"stringValue": "half-open"}}
        ]
      }]
    }]
  }]
}"#;

    #[test]
    fn json_as_the_spec_shows_it() {
        let encoding = Encoding::from_content_type("application/json; charset=utf-8");
        assert_eq!(encoding, Some(Encoding::Json));
        let spans = decode_traces(SPEC_TRACES.as_bytes(), Encoding::Json).expect("decodes");
        assert_eq!(spans.len(), 2);

        let server = &spans[0];
        assert_eq!(server.trace_id.to_string(), TRACE);
        assert_eq!(server.span_id.to_string(), "eee19b7ec3c1b174");
        assert_eq!(
            server.parent_span_id.map(|p| p.to_string()).as_deref(),
            Some("eee19b7ec3c1b173")
        );
        assert_eq!(&*server.service, "checkout");
        assert_eq!(server.instance.as_deref(), Some("checkout-2"));
        assert_eq!(server.name, "GET /cart");
        assert_eq!(server.kind, SpanKind::Server);
        assert_eq!(server.start, at(1_544_712_660_000_000_000));
        assert_eq!(server.duration, Duration::from_secs(1));
        assert_eq!(server.status, SpanStatus::Error);
        assert_eq!(
            server.status_message.as_deref(),
            Some("upstream unavailable")
        );
        assert_eq!(
            server.http,
            HttpHop {
                method: Some("GET".into()),
                path: Some("/cart".into()),
                status: Some(503),
                ..HttpHop::default()
            }
        );
        assert_eq!(
            server.attributes,
            [
                (
                    "my.span.attr".into(),
                    AttributeValue::Text("some value".into())
                ),
                ("retries".into(), AttributeValue::Int(2)),
                ("ratio".into(), AttributeValue::Float(0.5)),
                ("cached".into(), AttributeValue::Bool(true)),
                ("tags".into(), AttributeValue::Text(r#"["a",1]"#.into())),
                ("raw".into(), AttributeValue::Text("aGk=".into())),
            ]
        );

        let client = &spans[1];
        assert_eq!(client.parent_span_id, None, "an empty parent is a root");
        assert_eq!(client.kind, SpanKind::Internal, "no kind is unspecified");
        assert_eq!(client.start, at(1_544_712_660_100_000_000));
        assert_eq!(client.duration, Duration::from_millis(100));
        assert_eq!(client.status, SpanStatus::Unset);
        assert_eq!(
            client.http,
            HttpHop {
                method: Some("POST".into()),
                path: Some("/orders".into()),
                status: Some(201),
                peer_service: Some("payments".into()),
                attempts: None,
                breaker: Some("half-open".into()),
            },
            "legacy names fill the hop; an attempt count as text is not a count"
        );
        assert_eq!(
            client.attributes,
            [(
                "flotilla.retry.attempts".into(),
                AttributeValue::Text("2".into())
            )],
            "a well-known key with an unexpected type is kept, not lost"
        );
    }

    /// `examples/trace.json` and `examples/logs.json` of the opentelemetry-proto repository, as
    /// they are.
    const EXAMPLE_TRACES: &str = r#"{
  "resourceSpans": [
    {
      "resource": {
        "attributes": [
          {
            "key": "service.name",
            "value": {
              "stringValue": "my.service"
            }
          }
        ]
      },
      "scopeSpans": [
        {
          "scope": {
            "name": "my.library",
            "version": "1.0.0",
            "attributes": [
              {
                "key": "my.scope.attribute",
                "value": {
                  "stringValue": "some scope attribute"
                }
              }
            ]
          },
          "spans": [
            {
              "traceId": "5B8EFFF798038103D269B633813FC60C",
              "spanId": "EEE19B7EC3C1B174",
              "parentSpanId": "EEE19B7EC3C1B173",
              "name": "I'm a server span",
              "startTimeUnixNano": "1544712660000000000",
              "endTimeUnixNano": "1544712661000000000",
              "kind": 2,
              "attributes": [
                {
                  "key": "my.span.attr",
                  "value": {
                    "stringValue": "some value"
                  }
                }
              ]
            }
          ]
        }
      ]
    }
  ]
}"#;
    const EXAMPLE_LOGS: &str = r#"{
  "resourceLogs": [
    {
      "resource": {
        "attributes": [
          {
            "key": "service.name",
            "value": {
              "stringValue": "my.service"
            }
          }
        ]
      },
      "scopeLogs": [
        {
          "scope": {
            "name": "my.library",
            "version": "1.0.0",
            "attributes": [
              {
                "key": "my.scope.attribute",
                "value": {
                  "stringValue": "some scope attribute"
                }
              }
            ]
          },
          "logRecords": [
            {
              "timeUnixNano": "1544712660300000000",
              "observedTimeUnixNano": "1544712660300000000",
              "severityNumber": 10,
              "severityText": "Information",
              "traceId": "5B8EFFF798038103D269B633813FC60C",
              "spanId": "EEE19B7EC3C1B174",
              "body": {
                "stringValue": "Example log record"
              },
              "attributes": [
                {
                  "key": "string.attribute",
                  "value": {
                    "stringValue": "some string"
                  }
                },
                {
                  "key": "boolean.attribute",
                  "value": {
                    "boolValue": true
                  }
                },
                {
                  "key": "int.attribute",
                  "value": {
                    "intValue": "10"
                  }
                },
                {
                  "key": "double.attribute",
                  "value": {
                    "doubleValue": 637.704
                  }
                },
                {
                  "key": "array.attribute",
                  "value": {
                    "arrayValue": {
                      "values": [
                        {
                          "stringValue": "many"
                        },
                        {
                          "stringValue": "values"
                        }
                      ]
                    }
                  }
                },
                {
                  "key": "map.attribute",
                  "value": {
                    "kvlistValue": {
                      "values": [
                        {
                          "key": "some.map.key",
                          "value": {
                            "stringValue": "some value"
                          }
                        }
                      ]
                    }
                  }
                }
              ]
            }
          ]
        }
      ]
    }
  ]
}"#;

    #[test]
    fn the_examples_of_the_otlp_repository() {
        let spans = decode_traces(EXAMPLE_TRACES.as_bytes(), Encoding::Json).expect("decodes");
        assert_eq!(spans.len(), 1);
        assert_eq!(&*spans[0].service, "my.service");
        assert_eq!(spans[0].name, "I'm a server span");
        assert_eq!(spans[0].kind, SpanKind::Server);
        assert_eq!(spans[0].trace_id.to_string(), TRACE);
        assert_eq!(
            spans[0].attributes,
            [(
                "my.span.attr".into(),
                AttributeValue::Text("some value".into())
            )]
        );

        let records = decode_logs(EXAMPLE_LOGS.as_bytes(), Encoding::Json).expect("decodes");
        assert_eq!(records.len(), 1);
        assert_eq!(&*records[0].service, "my.service");
        assert_eq!(&*records[0].instance, "my.service");
        assert_eq!(records[0].line, "Example log record");
        assert_eq!(records[0].level, Some(Level::Info));
        assert_eq!(records[0].time, at(1_544_712_660_300_000_000));
        assert_eq!(records[0].trace_id, TraceId::parse(TRACE));
    }

    #[test]
    fn current_http_names_win_over_legacy_ones_in_any_order() {
        let body = traces_json(vec![span_json(json!({
            "attributes": [
                {"key": "url.path", "value": {"stringValue": "/new"}},
                {"key": "http.target", "value": {"stringValue": "/old"}},
                {"key": "http.status_code", "value": {"intValue": 500}},
                {"key": "http.response.status_code", "value": {"intValue": 200}},
            ]
        }))]);
        let spans = decode_traces(&body, Encoding::Json).expect("decodes");
        assert_eq!(spans[0].http.path.as_deref(), Some("/new"));
        assert_eq!(spans[0].http.status, Some(200));
    }

    /// What the protobuf JSON mapping allows and opentelemetry-proto's serde refuses on its own.
    #[test]
    fn json_the_mapping_allows_beyond_the_generated_serde() {
        let body = json!({
            "resourceSpans": [{
                "resource": null,
                "schemaUrl": null,
                "scopeSpans": [{
                    "scope": null,
                    "spans": [{
                        "traceId": TRACE,
                        "spanId": "eee19b7ec3c1b174",
                        "parentSpanId": null,
                        "traceState": null,
                        "name": "lenient",
                        "kind": "SPAN_KIND_CLIENT",
                        "startTimeUnixNano": "1000",
                        "endTimeUnixNano": "3000",
                        "droppedAttributesCount": "0",
                        "attributes": [
                            {"key": "empty", "value": {"arrayValue": {}}},
                            {"key": "map", "value": {"kvlistValue": {}}},
                            {"key": "quoted", "value": {"doubleValue": "2.5"}},
                            {"key": "nan", "value": {"doubleValue": "NaN"}},
                            {"key": "urlsafe", "value": {"bytesValue": "_-8"}},
                            {"key": "nothing", "value": null}
                        ],
                        "status": {"code": "STATUS_CODE_OK", "message": null}
                    }]
                }]
            }]
        });
        let spans = decode_traces(body.to_string().as_bytes(), Encoding::Json).expect("decodes");
        let span = &spans[0];
        assert_eq!(&*span.service, "unknown_service", "the OTel default");
        assert_eq!(span.instance, None);
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(span.status, SpanStatus::Ok);
        assert_eq!(span.duration, Duration::from_nanos(2000));
        assert_eq!(
            span.attributes,
            [
                ("empty".into(), AttributeValue::Text("[]".into())),
                ("map".into(), AttributeValue::Text("{}".into())),
                ("quoted".into(), AttributeValue::Float(2.5)),
                ("nan".into(), AttributeValue::Text("NaN".into())),
                ("urlsafe".into(), AttributeValue::Text("/+8=".into())),
            ]
        );
    }

    #[test]
    fn logs_in_json() {
        let body = json!({"resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "payments"}}]},
            "scopeLogs": [{"logRecords": [
                {
                    "timeUnixNano": "1544712660000000000",
                    "observedTimeUnixNano": "1544712669000000000",
                    "severityNumber": 17,
                    "severityText": "Error",
                    "body": {"stringValue": "card declined"},
                    "traceId": "5B8EFFF798038103D269B633813FC60C",
                    "spanId": "EEE19B7EC3C1B174"
                },
                {
                    "observedTimeUnixNano": 1544712661000000000u64,
                    "severityText": "warning",
                    "body": {"kvlistValue": {"values": [
                        {"key": "msg", "value": {"stringValue": "slow"}},
                        {"key": "ms", "value": {"intValue": "1200"}}
                    ]}},
                    "attributes": [{"key": "log.iostream", "value": {"stringValue": "stderr"}}]
                },
                {"body": {"intValue": "42"}, "severityNumber": 9, "traceId": ""}
            ]}]
        }]});
        let before = SystemTime::now();
        let records = decode_logs(body.to_string().as_bytes(), Encoding::Json).expect("decodes");
        let after = SystemTime::now();
        assert_eq!(records.len(), 3);
        for record in &records {
            assert_eq!(&*record.service, "payments");
            assert_eq!(&*record.instance, "payments", "the instance falls back");
        }
        assert_eq!(records[0].time, at(1_544_712_660_000_000_000));
        assert_eq!(records[0].level, Some(Level::Error));
        assert_eq!(records[0].line, "card declined");
        assert_eq!(records[0].stream, Stream::Stdout);
        assert_eq!(records[0].trace_id, TraceId::parse(TRACE));

        assert_eq!(records[1].time, at(1_544_712_661_000_000_000), "observed");
        assert_eq!(records[1].level, Some(Level::Warn), "from the text");
        assert_eq!(records[1].line, r#"{"msg":"slow","ms":1200}"#);
        assert_eq!(records[1].stream, Stream::Stderr);

        assert!(records[2].time >= before && records[2].time <= after, "now");
        assert_eq!(records[2].level, Some(Level::Info));
        assert_eq!(records[2].line, "42");
        assert_eq!(records[2].trace_id, None);
    }

    #[test]
    fn severity_numbers_map_to_levels() {
        let records: Vec<_> = (0..=25)
            .map(|n| json!({"severityNumber": n, "body": {"stringValue": "x"}}))
            .collect();
        let body = json!({"resourceLogs": [{"scopeLogs": [{"logRecords": records}]}]});
        let levels: Vec<_> = decode_logs(body.to_string().as_bytes(), Encoding::Json)
            .expect("decodes")
            .into_iter()
            .map(|r| r.level)
            .collect();
        let mut expected = vec![None];
        expected.extend([Some(Level::Trace); 4]);
        expected.extend([Some(Level::Debug); 4]);
        expected.extend([Some(Level::Info); 4]);
        expected.extend([Some(Level::Warn); 4]);
        expected.extend([Some(Level::Error); 8]);
        expected.push(None);
        assert_eq!(levels, expected);
    }

    fn sample_span(service: &str, n: u64) -> Span {
        Span {
            trace_id: TraceId(u128::from(n + 1).to_be_bytes()),
            span_id: SpanId((n + 1).to_be_bytes()),
            parent_span_id: (n % 2 == 1).then(|| SpanId((n + 10_000).to_be_bytes())),
            service: service.into(),
            instance: Some(format!("{service}-{}", n % 2).into()),
            name: Cow::Borrowed("GET"),
            kind: SpanKind::Client,
            start: at(1_700_000_000_123_456_789 + n),
            duration: Duration::from_nanos(1_500_001 + n),
            status: SpanStatus::Unset,
            status_message: None,
            http: HttpHop {
                method: Some(Cow::Borrowed("GET")),
                path: None,
                status: Some(200),
                peer_service: Some("catalog".into()),
                attempts: Some(1),
                breaker: Some(Cow::Borrowed("closed")),
            },
            attributes: vec![(
                "flotilla.test".into(),
                AttributeValue::Int(i64::try_from(n).expect("small")),
            )],
        }
    }

    fn by_id(mut spans: Vec<Span>) -> Vec<Span> {
        spans.sort_by_key(|s| s.span_id);
        spans
    }

    #[test]
    fn spans_round_trip_through_protobuf() {
        let mut spans = vec![
            sample_span("gateway", 1),
            sample_span("orders", 2),
            sample_span("gateway", 3),
        ];
        spans.push(Span {
            instance: None,
            parent_span_id: None,
            name: Cow::Owned("charge card".into()),
            kind: SpanKind::Server,
            status: SpanStatus::Error,
            status_message: Some("declined".into()),
            http: HttpHop {
                method: Some(Cow::Owned("PROPFIND".into())),
                path: Some("/charges/7".into()),
                status: Some(502),
                peer_service: None,
                attempts: Some(3),
                breaker: Some(Cow::Borrowed("half-open")),
            },
            attributes: vec![
                ("b".into(), AttributeValue::Bool(false)),
                ("f".into(), AttributeValue::Float(-1.25)),
                ("t".into(), AttributeValue::Text("ünïcode".into())),
                ("i".into(), AttributeValue::Int(i64::MIN)),
            ],
            ..sample_span("payments", 4)
        });
        for (kind, n) in [
            (SpanKind::Internal, 5),
            (SpanKind::Producer, 6),
            (SpanKind::Consumer, 7),
        ] {
            spans.push(Span {
                kind,
                status: SpanStatus::Ok,
                http: HttpHop::default(),
                attributes: Vec::new(),
                ..sample_span("queue", n)
            });
        }
        let body = encode_traces(&spans);
        let decoded = decode_traces(&body, Encoding::Protobuf).expect("decodes");
        assert_eq!(by_id(decoded.clone()), by_id(spans));
        let services: Vec<_> = decoded.iter().map(|s| &*s.service).collect();
        assert_eq!(
            services,
            [
                "gateway", "gateway", "orders", "payments", "queue", "queue", "queue"
            ],
            "grouped by resource, in order of first appearance"
        );
    }

    #[test]
    fn logs_round_trip_through_protobuf() {
        let record = |service: &str, instance: &str, stream, line: &str, level, trace| {
            Arc::new(LogRecord {
                time: at(1_700_000_000_987_654_321),
                service: service.into(),
                instance: instance.into(),
                version: None,
                stream,
                line: line.into(),
                level,
                trace_id: trace,
            })
        };
        let trace = TraceId::parse(TRACE);
        let records = vec![
            record(
                "orders",
                "orders-1",
                Stream::Stdout,
                "took order",
                Some(Level::Info),
                trace,
            ),
            record(
                "orders",
                "orders-2",
                Stream::Stderr,
                "oops",
                Some(Level::Error),
                None,
            ),
            record(
                "catalog",
                "catalog",
                Stream::Stdout,
                "{\"x\":1}",
                None,
                None,
            ),
            record(
                "orders",
                "orders-1",
                Stream::Stdout,
                "t",
                Some(Level::Trace),
                trace,
            ),
            record(
                "orders",
                "orders-1",
                Stream::Stdout,
                "d",
                Some(Level::Debug),
                None,
            ),
            record(
                "orders",
                "orders-1",
                Stream::Stderr,
                "w",
                Some(Level::Warn),
                None,
            ),
        ];
        let body = encode_logs(&records);
        let decoded = decode_logs(&body, Encoding::Protobuf).expect("decodes");
        let key = |r: &LogRecord| {
            (
                r.time,
                r.service.to_string(),
                r.instance.to_string(),
                r.stream,
                r.line.clone(),
                r.level,
                r.trace_id,
            )
        };
        let mut sent: Vec<_> = records.iter().map(|r| key(r)).collect();
        let mut got: Vec<_> = decoded.iter().map(key).collect();
        sent.sort_by(|a, b| a.4.cmp(&b.4));
        got.sort_by(|a, b| a.4.cmp(&b.4));
        assert_eq!(got, sent);
    }

    #[test]
    fn one_span_cannot_hold_unbounded_data() {
        let long = "é".repeat(10_000);
        let span = Span {
            name: Cow::Owned(long.clone()),
            status_message: Some(long.clone()),
            attributes: (0..1_000)
                .map(|i| (format!("key.{i}"), AttributeValue::Text(long.clone())))
                .collect(),
            ..sample_span("orders", 1)
        };
        let decoded = decode_traces(&encode_traces(&[span]), Encoding::Protobuf).expect("decodes");
        let span = &decoded[0];
        assert_eq!(span.attributes.len(), MAX_ATTRIBUTES);
        assert!(span.name.len() <= MAX_TEXT && span.name.ends_with('…'));
        assert!(
            span.status_message
                .as_ref()
                .is_some_and(|m| m.len() <= MAX_TEXT)
        );
        for (_, value) in &span.attributes {
            let AttributeValue::Text(text) = value else {
                panic!("text stays text")
            };
            assert!(text.len() <= MAX_TEXT);
        }
    }

    fn span_json(overrides: serde_json::Value) -> serde_json::Value {
        let mut span = json!({
            "traceId": TRACE,
            "spanId": "eee19b7ec3c1b174",
            "name": "x",
            "kind": 1,
            "startTimeUnixNano": "1000",
            "endTimeUnixNano": "2000",
        });
        if let (Some(span), serde_json::Value::Object(overrides)) =
            (span.as_object_mut(), overrides)
        {
            span.extend(overrides);
        }
        span
    }

    fn traces_json(spans: Vec<serde_json::Value>) -> Vec<u8> {
        json!({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]})
            .to_string()
            .into_bytes()
    }

    fn refused(body: &[u8], encoding: Encoding) -> String {
        decode_traces(body, encoding)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn malformed_requests_are_refused_whole_and_say_why() {
        let error = refused(b"\xff\xff\xff\xff\xff", Encoding::Protobuf);
        assert!(
            error.contains("not a protobuf ExportTraceServiceRequest"),
            "{error}"
        );

        let error = refused(b"{\"resourceSpans\": [", Encoding::Json);
        assert!(error.contains("not valid JSON"), "{error}");
        let error = refused(b"{\"resourceSpans\": 5}", Encoding::Json);
        assert!(
            error.contains("not an OTLP/JSON ExportTraceServiceRequest"),
            "{error}"
        );
        let error = refused(
            &traces_json(vec![span_json(json!({"traceId": "zz"}))]),
            Encoding::Json,
        );
        assert!(error.contains("not an OTLP/JSON"), "{error}");

        // A good span does not carry a bad one in with it.
        let body = json!({"resourceSpans": [{"scopeSpans": [
            {"spans": [span_json(json!({}))]},
            {"spans": [span_json(json!({})), span_json(json!({"traceId": "abcdef"}))]},
        ]}]});
        let error = refused(body.to_string().as_bytes(), Encoding::Json);
        assert_eq!(
            error,
            "resourceSpans[0].scopeSpans[1].spans[1]: traceId must be 16 bytes, got 3"
        );

        for (span, expected) in [
            (
                json!({"traceId": "00000000000000000000000000000000"}),
                "spans[0]: traceId must not be all zeros",
            ),
            (
                json!({"spanId": "0000000000000000"}),
                "spans[0]: spanId must not be all zeros",
            ),
            (
                json!({"spanId": ""}),
                "spans[0]: spanId must be 8 bytes, got 0",
            ),
            (
                json!({"parentSpanId": "abcd"}),
                "spans[0]: parentSpanId must be 8 bytes, got 2",
            ),
            (
                json!({"startTimeUnixNano": "3000", "endTimeUnixNano": "2000"}),
                "spans[0]: endTimeUnixNano 2000 is before startTimeUnixNano 3000",
            ),
            (
                json!({"startTimeUnixNano": "0"}),
                "spans[0]: startTimeUnixNano is missing",
            ),
        ] {
            let error = refused(&traces_json(vec![span_json(span)]), Encoding::Json);
            assert!(
                error.ends_with(expected),
                "{error} should end with {expected}"
            );
        }

        let body = json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [
            {"body": {"stringValue": "ok"}},
            {"body": {"stringValue": "bad"}, "traceId": "abcdef"},
        ]}]}]});
        let error = decode_logs(body.to_string().as_bytes(), Encoding::Json)
            .expect_err("refused")
            .to_string();
        assert_eq!(
            error,
            "resourceLogs[0].scopeLogs[0].logRecords[1]: traceId must be 16 bytes or empty, got 3"
        );
        let error = decode_logs(b"\x0a\x05", Encoding::Protobuf).expect_err("refused");
        assert!(
            error.to_string().contains("ExportLogsServiceRequest"),
            "{error}"
        );
    }

    #[test]
    fn content_types() {
        for (content_type, expected) in [
            ("application/x-protobuf", Some(Encoding::Protobuf)),
            ("application/protobuf", Some(Encoding::Protobuf)),
            ("Application/X-Protobuf ; foo=bar", Some(Encoding::Protobuf)),
            ("application/json", Some(Encoding::Json)),
            ("APPLICATION/JSON;charset=utf-8", Some(Encoding::Json)),
            ("text/plain", None),
            ("application/grpc", None),
            ("", None),
        ] {
            assert_eq!(
                Encoding::from_content_type(content_type),
                expected,
                "{content_type}"
            );
        }
        for encoding in [Encoding::Protobuf, Encoding::Json] {
            assert_eq!(
                Encoding::from_content_type(encoding.content_type()),
                Some(encoding)
            );
        }
    }

    #[test]
    fn answers_for_a_receiver() {
        use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
        assert_eq!(encode_success(Encoding::Json, Signal::Traces), b"{}");
        assert_eq!(encode_success(Encoding::Json, Signal::Logs), b"{}");
        let traces = encode_success(Encoding::Protobuf, Signal::Traces);
        let response = ExportTraceServiceResponse::decode(traces.as_slice()).expect("a response");
        assert_eq!(response.partial_success, None);
        let logs = encode_success(Encoding::Protobuf, Signal::Logs);
        let response = ExportLogsServiceResponse::decode(logs.as_slice()).expect("a response");
        assert_eq!(response.partial_success, None);

        let failure = encode_failure(Encoding::Json, "traceId \"x\" is bad");
        let failure: serde_json::Value = serde_json::from_slice(&failure).expect("JSON");
        assert_eq!(
            failure,
            json!({"code": 3, "message": "traceId \"x\" is bad"})
        );
        assert_eq!(Signal::Traces.path(), "/v1/traces");
        assert_eq!(Signal::Logs.path(), "/v1/logs");
    }

    // --- The exporter, against real sockets --------------------------------------------------------

    /// A collector on 127.0.0.1 that decodes what it receives with this crate's own decoders.
    struct Collector {
        addr: SocketAddr,
        spans: Arc<Mutex<Vec<Span>>>,
        logs: Arc<Mutex<Vec<LogRecord>>>,
        requests: Arc<AtomicUsize>,
    }

    /// Starts a collector answering the `n`th request (from 0) with `status(n)`.
    async fn collector(status: impl Fn(usize) -> u16 + Send + Sync + 'static) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let status = Arc::new(status);
        let state = (spans.clone(), logs.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (spans, logs, requests) = state.clone();
                let status = status.clone();
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let (spans, logs, requests) = (spans.clone(), logs.clone(), requests.clone());
                    let status = status.clone();
                    async move {
                        let n = requests.fetch_add(1, Ordering::SeqCst);
                        let path = request.uri().path().to_owned();
                        let encoding = request
                            .headers()
                            .get(http::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(Encoding::from_content_type);
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let answer = status(n);
                        let mut response = hyper::Response::new(Full::new(Bytes::new()));
                        *response.status_mut() =
                            http::StatusCode::from_u16(answer).expect("a status");
                        if answer == 200 {
                            let Some(encoding) = encoding else {
                                *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
                                return Ok::<_, Infallible>(response);
                            };
                            let decoded = match path.as_str() {
                                "/v1/traces" => decode_traces(&body, encoding)
                                    .map(|s| spans.lock().expect("lock").extend(s)),
                                "/v1/logs" => decode_logs(&body, encoding)
                                    .map(|l| logs.lock().expect("lock").extend(l)),
                                _ => {
                                    *response.status_mut() = http::StatusCode::NOT_FOUND;
                                    return Ok(response);
                                }
                            };
                            if let Err(e) = decoded {
                                *response.status_mut() = http::StatusCode::BAD_REQUEST;
                                *response.body_mut() =
                                    Full::new(encode_failure(encoding, e.message()).into());
                            }
                        } else {
                            *response.body_mut() =
                                Full::new(encode_failure(Encoding::Protobuf, "not now").into());
                        }
                        Ok(response)
                    }
                });
                tokio::spawn(async move {
                    // A client hanging up mid-request is not the test's concern.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            spans,
            logs,
            requests,
        }
    }

    /// Polls until `done` or ten seconds have passed; says which.
    async fn eventually(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done()
    }

    fn quick() -> ExportConfig {
        ExportConfig {
            batch: 64,
            interval: Duration::from_millis(20),
            timeout: Duration::from_secs(2),
            ..ExportConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_exporter_delivers_spans_and_logs() {
        let collector = collector(|_| 200).await;
        // A trailing slash is tolerated.
        let exporter =
            OtlpExporter::spawn(&format!("http://{}/", collector.addr), quick()).expect("spawns");
        let spans: Vec<Span> = (0..1_000)
            .map(|n| sample_span(if n % 3 == 0 { "orders" } else { "catalog" }, n))
            .collect();
        for span in &spans {
            exporter.export_span(span);
        }
        let records: Vec<_> = (0..100)
            .map(|n| {
                Arc::new(LogRecord::new(
                    "orders".into(),
                    "orders-1".into(),
                    Stream::Stdout,
                    format!("INFO line {n}"),
                ))
            })
            .collect();
        for record in &records {
            exporter.export_log(record);
        }
        // The exporter counts a batch once the collector's answer is read, a moment after the
        // collector has stored it: wait for both.
        let delivered = eventually(|| {
            let stats = exporter.stats();
            collector.spans.lock().expect("lock").len() == spans.len()
                && collector.logs.lock().expect("lock").len() == records.len()
                && stats.exported_spans == 1_000
                && stats.exported_logs == 100
        })
        .await;
        assert!(delivered, "stats: {:?}", exporter.stats());
        let received = collector.spans.lock().expect("lock").clone();
        assert_eq!(
            by_id(received),
            by_id(spans),
            "every span, services included"
        );
        let lines: Vec<_> = collector
            .logs
            .lock()
            .expect("lock")
            .iter()
            .map(|r| (r.line.clone(), r.level, r.instance.to_string()))
            .collect();
        assert_eq!(lines.len(), 100);
        assert!(lines.contains(&("INFO line 7".into(), Some(Level::Info), "orders-1".into())));
        assert_eq!(
            exporter.stats(),
            ExportStats {
                exported_spans: 1_000,
                exported_logs: 100,
                ..ExportStats::default()
            }
        );
        assert!(
            collector.requests.load(Ordering::SeqCst) >= 1_000 / 64,
            "batched, at most 64 a request"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unavailable_collector_is_retried() {
        let collector = collector(|n| if n == 0 { 503 } else { 200 }).await;
        let exporter =
            OtlpExporter::spawn(&format!("http://{}", collector.addr), quick()).expect("spawns");
        exporter.export_span(&sample_span("orders", 1));
        assert!(
            eventually(|| exporter.stats().exported_spans == 1).await,
            "{:?}",
            exporter.stats()
        );
        assert_eq!(collector.requests.load(Ordering::SeqCst), 2);
        assert_eq!(exporter.stats().failed_batches, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_batch_is_dropped_at_once() {
        let collector = collector(|_| 400).await;
        let exporter =
            OtlpExporter::spawn(&format!("http://{}", collector.addr), quick()).expect("spawns");
        for n in 0..10 {
            exporter.export_span(&sample_span("orders", n));
        }
        assert!(eventually(|| exporter.stats().failed_batches >= 1).await);
        // Longer than the first backoff: a retry would have happened by now.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stats = exporter.stats();
        assert_eq!(stats.dropped_spans, 10);
        assert_eq!(stats.exported_spans, 0);
        assert_eq!(
            collector.requests.load(Ordering::SeqCst),
            stats.failed_batches as usize,
            "one request per batch, no retries"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_collector_that_never_answers_costs_drops_not_memory_or_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let exporter = OtlpExporter::spawn(
            &format!("http://{addr}"),
            ExportConfig {
                queue: 100,
                batch: 10,
                interval: Duration::from_millis(10),
                timeout: Duration::from_millis(200),
            },
        )
        .expect("spawns");
        let span = sample_span("orders", 1);
        let started = Instant::now();
        for _ in 0..50_000 {
            exporter.export_span(&span);
        }
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(3), "blocked for {elapsed:?}");
        let stats = exporter.stats();
        assert_eq!(stats.exported_spans, 0);
        assert!(
            stats.dropped_spans >= 49_000,
            "at most the queue and a batch or two are held: {stats:?}"
        );
        // The request timeout gives the batch in flight up; it is then counted, not kept.
        assert!(
            eventually(|| exporter.stats().failed_batches >= 1).await,
            "{:?}",
            exporter.stats()
        );
        assert_eq!(exporter.stats().exported_spans, 0);
    }

    #[test]
    fn spawn_refuses_what_it_cannot_serve() {
        let error = OtlpExporter::spawn("http://127.0.0.1:4318", ExportConfig::default())
            .expect_err("no runtime");
        assert!(error.to_string().contains("tokio runtime"), "{error}");

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            for (endpoint, expected) in [
                ("https://collector:4318", "https is not supported"),
                ("ftp://collector", "must be an http:// URL"),
                ("collector:4318", "must be an http:// URL"),
                ("http://", "must be an http:// URL"),
                ("not a url at all", "not a URL"),
                ("http://collector:4318?x=1", "query"),
            ] {
                let error = OtlpExporter::spawn(endpoint, ExportConfig::default())
                    .expect_err(endpoint)
                    .to_string();
                assert!(
                    error.contains(expected),
                    "{endpoint}: {error} should say {expected}"
                );
            }
            let error = OtlpExporter::spawn(
                "http://127.0.0.1:4318",
                ExportConfig {
                    queue: 0,
                    ..ExportConfig::default()
                },
            )
            .expect_err("zero queue");
            assert!(error.to_string().contains("queue"), "{error}");
            for config in [
                ExportConfig {
                    batch: 0,
                    ..ExportConfig::default()
                },
                ExportConfig {
                    queue: usize::MAX,
                    ..ExportConfig::default()
                },
                ExportConfig {
                    interval: Duration::ZERO,
                    ..ExportConfig::default()
                },
                ExportConfig {
                    timeout: Duration::MAX,
                    ..ExportConfig::default()
                },
            ] {
                OtlpExporter::spawn("http://127.0.0.1:4318", config.clone())
                    .expect_err(&format!("{config:?}"));
            }
            OtlpExporter::spawn("http://127.0.0.1:4318/otlp/", ExportConfig::default())
                .expect("a base path is fine");
        });
    }
}
