//! The OpenAPI document (`GET /openapi.json`), assembled from the routes' own annotations and
//! the request and response types they (de)serialise, so it cannot drift from the code. Added
//! here: the error responses every route shares, in each API's shape, and the bearer scheme.

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Info, OpenApi, Ref, ResponseBuilder};
use utoipa::{OpenApi as _, PartialSchema, ToSchema};

use super::error::{KServeErrorBody, OpenAiErrorBody};
use super::routes;

/// The statuses any inference route may answer besides success, and when.
const ERRORS: &[(&str, &str)] = &[
    (
        "400",
        "Malformed JSON, a bad value, or an input the model cannot take",
    ),
    (
        "401",
        "A missing or unknown API key (when keys are configured)",
    ),
    ("404", "No such model"),
    ("413", "The body or the number of inputs is over the limit"),
    ("422", "Valid JSON of the wrong shape"),
    ("429", "Over this key's rate limit; see Retry-After"),
    (
        "503",
        "Queue full, draining, or (at the edge) upstream unavailable; see Retry-After",
    ),
    (
        "504",
        "The request passed its deadline; its work was cancelled",
    ),
];

pub fn document() -> OpenApi {
    let mut doc = routes::openai::Doc::openapi();
    doc.merge(routes::kserve::Doc::openapi());
    doc.merge(routes::health::Doc::openapi());
    #[cfg(feature = "generate")]
    doc.merge(routes::completions::Doc::openapi());
    let mut info = Info::new("Ember", env!("CARGO_PKG_VERSION"));
    info.description = Some(
        "Model serving: OpenAI-compatible routes under /v1, the KServe v2 Open Inference \
         Protocol under /v2, health and metrics."
            .into(),
    );
    doc.info = info;

    let components = doc.components.get_or_insert_with(Default::default);
    let mut error_schemas = vec![
        (OpenAiErrorBody::name().into(), OpenAiErrorBody::schema()),
        (KServeErrorBody::name().into(), KServeErrorBody::schema()),
    ];
    OpenAiErrorBody::schemas(&mut error_schemas);
    components.schemas.extend(error_schemas);
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );

    for (path, item) in doc.paths.paths.iter_mut() {
        let body = if path.starts_with("/v2") {
            KServeErrorBody::name()
        } else {
            OpenAiErrorBody::name()
        };
        let health = path.contains("/health/") || path == "/metrics";
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            for (status, description) in ERRORS {
                // Probes and the scrape endpoint only refuse keys, and only when keyed.
                if health && *status != "401" {
                    continue;
                }
                let response = ResponseBuilder::new()
                    .description(*description)
                    .content(
                        "application/json",
                        Content::new(Some(Ref::from_schema_name(body.clone()))),
                    )
                    .build();
                operation
                    .responses
                    .responses
                    .entry((*status).to_string())
                    .or_insert(response.into());
            }
            operation.security = Some(vec![
                Default::default(),
                utoipa::openapi::security::SecurityRequirement::new::<_, _, &str>("api_key", []),
            ]);
        }
    }
    doc
}

/// The document as JSON, built once.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        document()
            .to_json()
            .expect("the OpenAPI document serialises")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_described_with_its_errors() {
        let doc: serde_json::Value = serde_json::from_str(super::json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut expected = vec![
            "/v1/embeddings",
            "/v1/models",
            "/v2",
            "/v2/models/{name}",
            "/v2/models/{name}/ready",
            "/v2/models/{name}/infer",
            "/v2/health/live",
            "/v2/health/ready",
            "/metrics",
        ];
        if cfg!(feature = "generate") {
            expected.extend(["/v1/chat/completions", "/v1/completions"]);
        }
        for path in expected {
            assert!(paths.contains_key(path), "{path} is missing");
        }
        let embeddings = &paths["/v1/embeddings"]["post"];
        assert_eq!(
            embeddings["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/EmbeddingsRequest"
        );
        assert_eq!(
            embeddings["responses"]["429"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/OpenAiErrorBody"
        );
        let infer = &paths["/v2/models/{name}/infer"]["post"];
        assert_eq!(
            infer["responses"]["404"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/KServeErrorBody"
        );
        assert!(doc["components"]["schemas"]["InferRequest"].is_object());
    }
}
