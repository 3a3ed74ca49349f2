//! Image builds, imports and deletes: the store does the work, SQLite keeps the aliases.

use super::error::ApiError;
use super::Daemon;
use crate::types::{validate_name, Image, ImageSource, ImagesPost, ProgressEvent};
use ltv_containers::image::{DebianOptions, Progress};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Forwards store progress to a stream (or nowhere).
pub struct ChannelProgress(pub Option<mpsc::UnboundedSender<ProgressEvent>>);

impl Progress for ChannelProgress {
    fn stage(&self, message: &str) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(ProgressEvent::Stage {
                message: message.to_string(),
            });
        }
    }
    fn advance(&self, done: u64, total: Option<u64>) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(ProgressEvent::Advance { done, total });
        }
    }
}

fn default_alias(req: &ImagesPost) -> Result<String, ApiError> {
    let alias = match (&req.alias, &req.source) {
        (Some(a), _) => a.clone(),
        (None, ImageSource::Build { builder, .. }) => builder.clone(),
        (None, ImageSource::Import { .. }) => {
            return Err(ApiError::bad_request(
                "an import needs an alias (`--alias NAME`)",
            ));
        }
    };
    validate_name(&alias).map_err(|e| ApiError::bad_request(format!("alias: {e}")))?;
    Ok(alias)
}

impl Daemon {
    /// Imports an uploaded image archive, spooled to a file under the state dir first.
    pub async fn upload_image(
        self: &Arc<Self>,
        alias: String,
        body: axum::body::Body,
    ) -> Result<Image, ApiError> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        validate_name(&alias).map_err(|e| ApiError::bad_request(format!("alias: {e}")))?;
        let dir = self.config.state_dir.join("uploads");
        let io = |e: std::io::Error| {
            ApiError::internal(format!("spool upload in {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let spool = tempfile::Builder::new()
            .suffix(".tar")
            .tempfile_in(&dir)
            .map_err(io)?;
        let mut file = tokio::fs::File::from_std(spool.reopen().map_err(io)?);
        let mut chunks = body.into_data_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::bad_request(format!("upload cut short: {e}")))?;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        let req = ImagesPost {
            alias: Some(alias),
            source: ImageSource::Import {
                path: spool.path().display().to_string(),
            },
        };
        // The spool goes when `spool` drops, whatever the import did.
        self.add_image(req, ChannelProgress(None)).await
    }

    /// Builds or imports an image and records its alias. Blocking work runs off the runtime.
    pub async fn add_image(
        self: &Arc<Self>,
        req: ImagesPost,
        progress: ChannelProgress,
    ) -> Result<Image, ApiError> {
        let alias = default_alias(&req)?;
        let op = self.db.begin_operation("image-add", &alias)?;
        let daemon = self.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<Image, ApiError> {
            let info = match &req.source {
                ImageSource::Build {
                    builder,
                    suite,
                    include,
                    mirror,
                } => match builder.as_str() {
                    "busybox" => daemon.images.build_busybox(&progress)?,
                    "debian" => daemon.images.build_debian(
                        &DebianOptions {
                            suite: suite.clone().unwrap_or_else(|| "bookworm".into()),
                            include: include.clone(),
                            mirror: mirror.clone(),
                        },
                        &progress,
                    )?,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "unknown image builder {other:?} (expected busybox or debian)"
                        )))
                    }
                },
                ImageSource::Import { path } => {
                    let path = PathBuf::from(path);
                    if !path.exists() {
                        return Err(ApiError::bad_request(format!(
                            "{} does not exist",
                            path.display()
                        )));
                    }
                    daemon.images.import(&path, &progress)?
                }
            };
            Ok(daemon.db.put_image(&alias, &info)?)
        })
        .await
        .map_err(|e| ApiError::internal(format!("image task failed: {e}")))
        .and_then(|r| r);
        let _ = self
            .db
            .finish_operation(op, result.as_ref().err().map(|e| e.message.as_str()));
        result
    }

    pub fn delete_image(&self, alias: &str) -> Result<(), ApiError> {
        let image = self
            .db
            .images()?
            .into_iter()
            .find(|i| i.alias == alias)
            .ok_or_else(|| ApiError::not_found(format!("image {alias:?} not found")))?;
        let users = self.db.instances_using_image(&image.fingerprint)?;
        if !users.is_empty() {
            return Err(ApiError::conflict(format!(
                "image {alias:?} is used by instances: {}",
                users.join(", ")
            )));
        }
        if !self.db.delete_image(alias, &image.fingerprint)? {
            self.images.delete(&image.fingerprint)?;
        }
        Ok(())
    }
}
