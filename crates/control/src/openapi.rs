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
      "LogRecord": {
        "type": "object",
        "required": ["time", "service", "instance", "stream", "line"],
        "properties": {
          "time": { "type": "string", "format": "date-time" },
          "service": { "type": "string" },
          "instance": { "type": "string" },
          "stream": { "enum": ["stdout", "stderr", "system"] },
          "line": { "type": "string" }
        }
      }
    }
  }
}
"##;
