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
