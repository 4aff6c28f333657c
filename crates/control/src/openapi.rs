//! The OpenAPI 3.1 description of the control API, served at `/v1/openapi.json`.
//!
//! Written by hand rather than generated: the API is small, and a generator would cost more
//! compile time than the document costs to keep true. A test checks every route is described.

pub(crate) const DOCUMENT: &str = r##"{
  "openapi": "3.1.0",
  "info": {
    "title": "Flotilla control API",
    "version": "1",
    "description": "Inspect and steer a running Flotilla fleet. Errors are RFC 7807 application/problem+json."
  },
  "paths": {
    "/healthz": {
      "get": {
        "summary": "Liveness of the control plane",
        "responses": { "200": { "description": "Alive", "content": { "application/json": { "schema": { "type": "object", "properties": { "status": { "const": "ok" } } } } } } }
      }
    },
    "/v1/app": {
      "get": {
        "summary": "The running app: name, addresses, process and phase",
        "responses": { "200": { "description": "The app", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/App" } } } } }
      }
    },
    "/v1/services": {
      "get": {
        "summary": "Every service with its instances",
        "responses": { "200": { "description": "Services in dependency order", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Service" } } } } } }
      }
    },
    "/v1/services/{name}": {
      "get": {
        "summary": "One service with its instances",
        "parameters": [ { "name": "name", "in": "path", "required": true, "schema": { "type": "string" } } ],
        "responses": {
          "200": { "description": "The service", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Service" } } } },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/services/{name}/faults": {
      "parameters": [ { "name": "name", "in": "path", "required": true, "schema": { "type": "string" } } ],
      "get": {
        "summary": "The faults injected into every call to one service",
        "responses": {
          "200": { "description": "The faults in force", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Faults" } } } },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      },
      "put": {
        "summary": "Inject delays and/or aborts into every call to one service, from every caller (replaces what was set)",
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Faults" } } } },
        "responses": {
          "200": { "description": "The faults now in force, defaults filled in", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Faults" } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" },
          "422": { "$ref": "#/components/responses/Problem" }
        }
      },
      "delete": {
        "summary": "Stop injecting faults into one service",
        "responses": {
          "204": { "description": "Cleared" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/faults": {
      "get": {
        "summary": "Every service with faults injected",
        "responses": { "200": { "description": "Service name to its faults", "content": { "application/json": { "schema": { "type": "object", "additionalProperties": { "$ref": "#/components/schemas/Faults" } } } } } }
      }
    },
    "/v1/breakers": {
      "get": {
        "summary": "Every circuit breaker (one per caller and callee service) and every instance outlier record",
        "responses": { "200": { "description": "Sorted by caller, service and instance", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Breaker" } } } } } }
      }
    },
    "/v1/logs": {
      "get": {
        "summary": "Captured service logs, oldest first",
        "parameters": [
          { "name": "service", "in": "query", "schema": { "type": "string" } },
          { "name": "instance", "in": "query", "schema": { "type": "string" } },
          { "name": "since", "in": "query", "description": "A duration back from now (5m, 1h) or an RFC 3339 time", "schema": { "type": "string" } },
          { "name": "limit", "in": "query", "description": "The newest N matching lines (default 1000, at most 10000)", "schema": { "type": "integer", "minimum": 0 } },
          { "name": "level", "in": "query", "description": "Only lines at this level or above", "schema": { "type": "string", "enum": ["trace", "debug", "info", "warn", "error"] } },
          { "name": "grep", "in": "query", "description": "Only lines containing this text (ASCII case ignored)", "schema": { "type": "string" } },
          { "name": "trace", "in": "query", "description": "Only lines of this trace (32 hex digits): one request across every service", "schema": { "type": "string", "pattern": "^[0-9a-fA-F]{32}$" } },
          { "name": "follow", "in": "query", "description": "Keep the response open and stream new lines as NDJSON", "schema": { "type": "boolean" } }
        ],
        "responses": {
          "200": {
            "description": "Log records",
            "content": {
              "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/LogRecord" } } },
              "application/x-ndjson": { "schema": { "$ref": "#/components/schemas/LogRecord" } }
            }
          },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/logs/stream": {
      "get": {
        "summary": "The newest matching lines (default 100), then every new one, as server-sent events",
        "description": "Takes the filters of /v1/logs except follow. Each record is an `event: log` whose `data` is the record as JSON; an idle stream sends a keep-alive comment every 15 s.",
        "parameters": [
          { "name": "service", "in": "query", "schema": { "type": "string" } },
          { "name": "instance", "in": "query", "schema": { "type": "string" } },
          { "name": "since", "in": "query", "description": "A duration back from now (5m, 1h) or an RFC 3339 time", "schema": { "type": "string" } },
          { "name": "limit", "in": "query", "description": "Lines of backlog (default 100, at most 10000)", "schema": { "type": "integer", "minimum": 0 } },
          { "name": "level", "in": "query", "description": "Only lines at this level or above", "schema": { "type": "string", "enum": ["trace", "debug", "info", "warn", "error"] } },
          { "name": "grep", "in": "query", "description": "Only lines containing this text (ASCII case ignored)", "schema": { "type": "string" } },
          { "name": "trace", "in": "query", "description": "Only lines of this trace", "schema": { "type": "string", "pattern": "^[0-9a-fA-F]{32}$" } }
        ],
        "responses": {
          "200": { "description": "An event stream", "content": { "text/event-stream": { "schema": { "type": "string" } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/topics": {
      "get": {
        "summary": "Every declared topic: partitions with offsets, each subscriber's lag, dead letters",
        "responses": {
          "200": { "description": "Topics", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/Topic" } } } } },
          "503": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/topics/{topic}": {
      "get": {
        "summary": "One topic",
        "parameters": [ { "name": "topic", "in": "path", "required": true, "schema": { "type": "string" } } ],
        "responses": {
          "200": { "description": "The topic", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Topic" } } } },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/topics/{topic}/events": {
      "post": {
        "summary": "Publish one CloudEvent 1.0; answered once it is durable",
        "description": "Structured mode (application/cloudevents+json, or application/json holding one event) or binary mode (ce-* headers, the body is data). Missing id, source, time and traceparent are filled in.",
        "parameters": [ { "name": "topic", "in": "path", "required": true, "schema": { "type": "string" } } ],
        "requestBody": { "required": true, "content": { "application/cloudevents+json": { "schema": { "type": "object", "required": ["specversion", "type"] } } } },
        "responses": {
          "202": { "description": "Stored", "content": { "application/json": { "schema": { "type": "object", "properties": { "id": { "type": "string" }, "topic": { "type": "string" }, "partition": { "type": "integer" }, "offset": { "type": "integer" } } } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" },
          "413": { "$ref": "#/components/responses/Problem" },
          "415": { "$ref": "#/components/responses/Problem" },
          "507": { "$ref": "#/components/responses/Problem" }
        }
      },
      "get": {
        "summary": "Stored events of one partition from an offset, oldest first",
        "parameters": [
          { "name": "topic", "in": "path", "required": true, "schema": { "type": "string" } },
          { "name": "partition", "in": "query", "schema": { "type": "integer", "minimum": 0, "default": 0 } },
          { "name": "from", "in": "query", "schema": { "type": "integer", "minimum": 0, "default": 0 } },
          { "name": "limit", "in": "query", "description": "At most N (default 100, at most 1000)", "schema": { "type": "integer", "minimum": 0 } }
        ],
        "responses": {
          "200": { "description": "Events", "content": { "application/json": { "schema": { "type": "array", "items": { "type": "object", "properties": { "partition": { "type": "integer" }, "offset": { "type": "integer" }, "time": { "type": "string", "format": "date-time" }, "event": { "type": "object" } } } } } } },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/topics/{topic}/replay": {
      "post": {
        "summary": "Deliver a topic to one subscriber again from an offset or a time",
        "parameters": [ { "name": "topic", "in": "path", "required": true, "schema": { "type": "string" } } ],
        "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["service"], "properties": { "service": { "type": "string" }, "from_offset": { "type": "integer" }, "from_time": { "type": "string" } } } } } },
        "responses": {
          "202": { "description": "The positions each partition restarts from" },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/topics/{topic}/redrive": {
      "post": {
        "summary": "Deliver a dead-letter topic's events again to the subscribers they failed at",
        "parameters": [ { "name": "topic", "in": "path", "required": true, "description": "TOPIC.dlq", "schema": { "type": "string" } } ],
        "responses": {
          "200": { "description": "How many were redriven", "content": { "application/json": { "schema": { "type": "object", "properties": { "topic": { "type": "string" }, "redriven": { "type": "integer" } } } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/sagas": {
      "get": {
        "summary": "Sagas, newest first",
        "parameters": [
          { "name": "status", "in": "query", "schema": { "type": "string", "enum": ["running", "compensating", "completed", "compensated", "failed"] } },
          { "name": "name", "in": "query", "schema": { "type": "string" } },
          { "name": "limit", "in": "query", "description": "At most N (default 50, at most 1000)", "schema": { "type": "integer", "minimum": 1 } }
        ],
        "responses": {
          "200": { "description": "Sagas", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/SagaItem" } } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/sagas/{key}": {
      "post": {
        "summary": "Start the saga named `key` with the body as its input",
        "description": "With an Idempotency-Key header, a second start with the same key answers 200 with the saga the first one started.",
        "parameters": [
          { "name": "key", "in": "path", "required": true, "description": "The saga's name, as declared under [sagas.NAME]", "schema": { "type": "string" } },
          { "name": "Idempotency-Key", "in": "header", "schema": { "type": "string", "maxLength": 255 } }
        ],
        "requestBody": { "content": { "application/json": { "schema": {} } } },
        "responses": {
          "202": { "description": "Started", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StartedSaga" } } } },
          "200": { "description": "Started earlier with this Idempotency-Key", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/StartedSaga" } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" },
          "413": { "$ref": "#/components/responses/Problem" }
        }
      },
      "get": {
        "summary": "The saga with id `key` and its timeline",
        "parameters": [
          { "name": "key", "in": "path", "required": true, "description": "The saga's id", "schema": { "type": "string" } },
          { "name": "wait", "in": "query", "description": "Answer once the saga is final, or after this long (at most 60s), like 10s", "schema": { "type": "string" } }
        ],
        "responses": {
          "200": { "description": "The saga", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Saga" } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/traces": {
      "get": {
        "summary": "Recent traces: one per request through the gateway (or call between services), newest first",
        "parameters": [
          { "name": "service", "in": "query", "description": "Only traces with a span of this service (or gateway)", "schema": { "type": "string" } },
          { "name": "errors", "in": "query", "description": "Only traces with a failed span", "schema": { "type": "boolean", "default": false } },
          { "name": "slowest", "in": "query", "description": "The N longest traces, longest first, instead of the newest", "schema": { "type": "integer", "minimum": 0 } },
          { "name": "since", "in": "query", "description": "Only traces that started after: a duration back from now (5m, 1h) or an RFC 3339 time", "schema": { "type": "string" } },
          { "name": "limit", "in": "query", "description": "At most N traces (default 50, at most 1000)", "schema": { "type": "integer", "minimum": 0 } }
        ],
        "responses": {
          "200": { "description": "Trace summaries", "content": { "application/json": { "schema": { "type": "array", "items": { "$ref": "#/components/schemas/TraceSummary" } } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/traces/{id}": {
      "get": {
        "summary": "Every span held for one trace, by start time",
        "parameters": [ { "name": "id", "in": "path", "required": true, "description": "32 hexadecimal digits", "schema": { "type": "string", "pattern": "^[0-9a-fA-F]{32}$" } } ],
        "responses": {
          "200": { "description": "The trace", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/TraceDetail" } } } },
          "400": { "$ref": "#/components/responses/Problem" },
          "404": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/v1/health": {
      "get": {
        "summary": "Instance health rolled up to services and the app, with the reason",
        "responses": { "200": { "description": "The app's health", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Health" } } } } }
      }
    },
    "/v1/map": {
      "get": {
        "summary": "The application map: services with their health, and the calls between them observed over a window",
        "parameters": [ { "name": "window", "in": "query", "description": "How far back calls count, 1s to 24h (default 5m)", "schema": { "type": "string", "default": "5m" } } ],
        "responses": {
          "200": { "description": "The map", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Map" } } } },
          "400": { "$ref": "#/components/responses/Problem" }
        }
      }
    },
    "/metrics": {
      "get": {
        "summary": "Prometheus metrics: calls per edge by status class, latency histograms, calls in flight, retries, breaker states, instance restarts and health, dropped spans",
        "responses": { "200": { "description": "Text exposition format 0.0.4", "content": { "text/plain; version=0.0.4": { "schema": { "type": "string" } } } } }
      }
    },
    "/v1/shutdown": {
      "post": {
        "summary": "Stop every service gracefully, then the fleet process",
        "responses": { "202": { "description": "Stopping" } }
      }
    }
  },
  "components": {
    "responses": {
      "Problem": { "description": "An error", "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } } }
    },
    "schemas": {
      "SagaError": { "type": ["object", "null"], "properties": { "step": { "type": "string" }, "status": { "type": ["integer", "null"] }, "message": { "type": "string" } } },
      "SagaItem": { "type": "object", "properties": { "id": { "type": "string" }, "name": { "type": "string" }, "status": { "type": "string", "enum": ["running", "compensating", "completed", "compensated", "failed"] }, "created_at": { "type": "string", "format": "date-time" }, "updated_at": { "type": "string", "format": "date-time" }, "error": { "$ref": "#/components/schemas/SagaError" } } },
      "StartedSaga": { "type": "object", "properties": { "id": { "type": "string" }, "name": { "type": "string" }, "status": { "type": "string" }, "created": { "type": "boolean" } } },
      "SagaCall": { "type": ["object", "null"], "properties": { "status": { "type": "string", "enum": ["pending", "running", "retrying", "succeeded", "failed"] }, "attempts": { "type": "integer" }, "started_ms": { "type": ["integer", "null"] }, "finished_ms": { "type": ["integer", "null"] }, "duration_ms": { "type": ["integer", "null"] }, "http_status": { "type": ["integer", "null"] }, "error": { "type": ["string", "null"] }, "response": {} } },
      "Saga": { "allOf": [ { "$ref": "#/components/schemas/SagaItem" }, { "type": "object", "properties": { "input": {}, "key": { "type": ["string", "null"] }, "trace_id": { "type": ["string", "null"] }, "deadline": { "type": ["string", "null"] }, "steps": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "call": { "type": "string" }, "action": { "$ref": "#/components/schemas/SagaCall" }, "compensate": { "$ref": "#/components/schemas/SagaCall" } } } } } } ] },
      "Topic": {
        "type": "object",
        "properties": {
          "topic": { "type": "string" },
          "partitions": { "type": "array", "items": { "type": "object", "properties": { "partition": { "type": "integer" }, "start_offset": { "type": "integer" }, "end_offset": { "type": "integer" }, "records": { "type": "integer" }, "bytes": { "type": "integer" } } } },
          "subscribers": { "type": "array", "items": { "type": "object", "properties": { "service": { "type": "string" }, "path": { "type": "string" }, "lag": { "type": "integer" }, "delivered": { "type": "integer" }, "dead_lettered": { "type": "integer" } } } },
          "dead_letters": { "type": "integer" }
        }
      },
      "Problem": {
        "type": "object",
        "properties": { "type": { "type": "string" }, "title": { "type": "string" }, "status": { "type": "integer" }, "detail": { "type": "string" } }
      },
      "App": {
        "type": "object",
        "required": ["app", "dir", "pid", "gateway", "control", "started_at", "phase"],
        "properties": {
          "app": { "type": "string" },
          "dir": { "type": "string" },
          "pid": { "type": "integer" },
          "gateway": { "type": "string", "format": "uri" },
          "control": { "type": "string", "format": "uri" },
          "started_at": { "type": "string", "format": "date-time" },
          "phase": {
            "type": "object",
            "properties": {
              "state": { "enum": ["building", "starting", "ready", "failed", "stopping"] },
              "detail": { "type": "string" }
            }
          }
        }
      },
      "Service": {
        "type": "object",
        "required": ["name", "version", "replicas", "healthy", "instances"],
        "properties": {
          "name": { "type": "string" },
          "version": { "type": "string" },
          "replicas": { "type": "integer" },
          "healthy": { "type": "integer" },
          "instances": { "type": "array", "items": { "$ref": "#/components/schemas/Instance" } }
        }
      },
      "Instance": {
        "type": "object",
        "required": ["service", "instance", "pid", "port", "state", "health", "restarts", "version"],
        "properties": {
          "service": { "type": "string" },
          "instance": { "type": "string" },
          "pid": { "type": ["integer", "null"] },
          "port": { "type": ["integer", "null"] },
          "state": { "enum": ["starting", "running", "backoff", "crash-loop", "stopping", "stopped"] },
          "health": { "enum": ["unknown", "healthy", "unhealthy"] },
          "restarts": { "type": "integer" },
          "version": { "type": "string" },
          "uptime_seconds": { "type": ["integer", "null"] },
          "last_exit": { "type": ["string", "null"] },
          "last_error": { "type": ["string", "null"] }
        }
      },
      "Faults": {
        "type": "object",
        "description": "At least one of delay and abort.",
        "additionalProperties": false,
        "properties": {
          "delay": { "type": "string", "description": "Hold each call this long before sending it, e.g. 300ms; at most 1h" },
          "delay_percent": { "type": "integer", "minimum": 0, "maximum": 100, "default": 100, "description": "Share of calls delayed" },
          "abort": { "type": "integer", "minimum": 400, "maximum": 599, "description": "Answer with this status instead of calling the service" },
          "abort_percent": { "type": "integer", "minimum": 0, "maximum": 100, "default": 100, "description": "Share of calls aborted" }
        }
      },
      "Breaker": {
        "type": "object",
        "required": ["caller", "service", "state", "state_for_ms", "consecutive_failures", "window_calls", "window_failures", "in_flight", "times_opened"],
        "properties": {
          "caller": { "type": "string", "description": "gateway, or the instance whose sidecar calls (orders-1)" },
          "service": { "type": "string", "description": "The callee service" },
          "instance": { "type": "string", "description": "Set for an instance's outlier record (open means ejected); absent for the service's breaker" },
          "state": { "enum": ["closed", "open", "half-open"] },
          "state_for_ms": { "type": "integer", "description": "Milliseconds in the current state" },
          "consecutive_failures": { "type": "integer" },
          "window_calls": { "type": "integer", "description": "Calls in the sliding window (service breakers only)" },
          "window_failures": { "type": "integer", "description": "Failures in the sliding window (service breakers only)" },
          "in_flight": { "type": "integer", "description": "Calls in flight now" },
          "times_opened": { "type": "integer", "description": "How often it opened (or the instance was ejected)" },
          "retry_in_ms": { "type": "integer", "description": "While open: milliseconds until probes are let through (or the instance returns)" }
        }
      },
      "TraceSummary": {
        "type": "object",
        "required": ["trace_id", "root_service", "root_name", "start", "duration", "spans", "services", "error"],
        "properties": {
          "trace_id": { "type": "string", "pattern": "^[0-9a-f]{32}$" },
          "root_service": { "type": "string", "description": "Service of the root span, or of the earliest span held when the root is missing" },
          "root_name": { "type": "string" },
          "start": { "type": "string", "format": "date-time" },
          "duration": { "type": "integer", "description": "Microseconds: the root span's, or from the earliest start to the latest end when the root is missing" },
          "spans": { "type": "integer", "description": "Spans held for the trace" },
          "services": { "type": "array", "items": { "type": "string" }, "description": "Every service with a span in the trace, sorted" },
          "error": { "type": "boolean", "description": "Whether any span failed: status error, or an HTTP status of 500 or more" }
        }
      },
      "TraceDetail": {
        "type": "object",
        "required": ["trace_id", "spans"],
        "properties": {
          "trace_id": { "type": "string", "pattern": "^[0-9a-f]{32}$" },
          "spans": { "type": "array", "items": { "$ref": "#/components/schemas/Span" }, "description": "By start time, a parent before its children when they start together" }
        }
      },
      "Span": {
        "type": "object",
        "required": ["trace_id", "span_id", "parent_span_id", "service", "instance", "name", "kind", "start", "duration", "status", "http"],
        "properties": {
          "trace_id": { "type": "string", "pattern": "^[0-9a-f]{32}$" },
          "span_id": { "type": "string", "pattern": "^[0-9a-f]{16}$" },
          "parent_span_id": { "type": ["string", "null"], "pattern": "^[0-9a-f]{16}$" },
          "service": { "type": "string", "description": "The service the span belongs to, or gateway" },
          "instance": { "type": ["string", "null"], "description": "The instance, when known (orders-2)" },
          "name": { "type": "string" },
          "kind": { "enum": ["internal", "server", "client", "producer", "consumer"], "description": "client at the caller's side of a hop, server at the callee's" },
          "start": { "type": "string", "format": "date-time" },
          "duration": { "type": "integer", "description": "Microseconds" },
          "status": { "enum": ["unset", "ok", "error"] },
          "status_message": { "type": "string", "description": "Why it failed, when it did without an answer" },
          "http": {
            "type": "object",
            "properties": {
              "method": { "type": ["string", "null"] },
              "path": { "type": ["string", "null"] },
              "status": { "type": ["integer", "null"] },
              "peer_service": { "type": ["string", "null"], "description": "The callee for a client span, the caller for a server span" },
              "attempts": { "type": ["integer", "null"], "description": "Tries the call took" },
              "breaker": { "type": ["string", "null"], "description": "The caller's breaker for the callee after the call" }
            }
          },
          "attributes": { "type": "array", "items": { "type": "array", "prefixItems": [ { "type": "string" }, { "type": ["string", "number", "boolean"] } ], "minItems": 2, "maxItems": 2 }, "description": "Other attributes as [key, value] pairs" }
        }
      },
      "HealthStatus": { "enum": ["healthy", "degraded", "down"], "description": "healthy: every instance asked for is; degraded: some are; down: none are" },
      "Health": {
        "type": "object",
        "required": ["status", "services"],
        "properties": {
          "status": { "$ref": "#/components/schemas/HealthStatus", "description": "The worst of the services, but degraded rather than down while some service is not down" },
          "services": { "type": "array", "items": { "$ref": "#/components/schemas/ServiceHealth" } }
        }
      },
      "ServiceHealth": {
        "type": "object",
        "required": ["name", "status", "healthy", "replicas", "reason"],
        "properties": {
          "name": { "type": "string" },
          "status": { "$ref": "#/components/schemas/HealthStatus" },
          "healthy": { "type": "integer", "description": "Instances passing health checks" },
          "replicas": { "type": "integer", "description": "Instances the manifest asks for" },
          "reason": { "type": "string", "description": "e.g. 1 of 2 instances healthy (orders-1: connection refused)" }
        }
      },
      "Map": {
        "type": "object",
        "required": ["window_seconds", "nodes", "edges", "unused"],
        "properties": {
          "window_seconds": { "type": "number" },
          "nodes": { "type": "array", "items": { "$ref": "#/components/schemas/MapNode" }, "description": "The gateway, then the services in dependency order" },
          "edges": { "type": "array", "items": { "$ref": "#/components/schemas/MapEdge" }, "description": "Calls observed in the window, by caller then callee" },
          "unused": { "type": "array", "items": { "$ref": "#/components/schemas/Dependency" }, "description": "depends_on entries with no call in the window" }
        }
      },
      "MapNode": {
        "type": "object",
        "required": ["name", "health", "instances", "healthy", "version"],
        "properties": {
          "name": { "type": "string" },
          "health": { "$ref": "#/components/schemas/HealthStatus" },
          "instances": { "type": "integer", "description": "Instances the manifest asks for" },
          "healthy": { "type": "integer" },
          "version": { "type": "string" }
        }
      },
      "MapEdge": {
        "type": "object",
        "required": ["caller", "callee", "requests", "errors", "requests_per_second", "error_rate", "p50_ms", "p99_ms", "declared"],
        "properties": {
          "caller": { "type": "string" },
          "callee": { "type": "string" },
          "requests": { "type": "integer" },
          "errors": { "type": "integer", "description": "Calls that failed: no answer, or a status of 500 or more" },
          "requests_per_second": { "type": "number", "description": "requests over the window's length" },
          "error_rate": { "type": "number", "description": "errors / requests, 0 to 1" },
          "p50_ms": { "type": "number", "description": "Median call duration in milliseconds" },
          "p99_ms": { "type": "number", "description": "99th percentile call duration in milliseconds" },
          "declared": { "type": "boolean", "description": "The caller's depends_on names the callee (for the gateway: a route leads to it)" }
        }
      },
      "Dependency": {
        "type": "object",
        "required": ["caller", "callee"],
        "properties": { "caller": { "type": "string" }, "callee": { "type": "string" } }
      },
      "LogRecord": {
        "type": "object",
        "required": ["time", "service", "instance", "stream", "line"],
        "properties": {
          "time": { "type": "string", "format": "date-time" },
          "service": { "type": "string" },
          "instance": { "type": "string" },
          "stream": { "enum": ["stdout", "stderr", "system"] },
          "line": { "type": "string" },
          "level": { "enum": ["trace", "debug", "info", "warn", "error"], "description": "Read from the line when it says" },
          "trace_id": { "type": "string", "description": "The trace the line names, 32 hex digits" }
        }
      }
    }
  }
}
"##;
