{{/*
Names, labels and the pieces the Deployment and the DaemonSet share (the pod template).
*/}}

{{- define "ember.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name alone when it already contains the chart's. */}}
{{- define "ember.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ember.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes' recommended labels; the component is the tier (cloud or edge). */}}
{{- define "ember.labels" -}}
helm.sh/chart: {{ include "ember.chart" . }}
{{ include "ember.selectorLabels" . }}
app.kubernetes.io/component: {{ .Values.mode }}
app.kubernetes.io/part-of: ember
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ember.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ember.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ember.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ember.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "true" when this release runs on GPUs: the cloud tier with gpu.enabled. */}}
{{- define "ember.gpu" -}}
{{- if and (eq .Values.mode "cloud") .Values.gpu.enabled }}true{{ end }}
{{- end }}

{{/* The image flavour: cuda, cpu or edge (docker/Dockerfile.<flavour>). */}}
{{- define "ember.flavour" -}}
{{- if eq .Values.mode "edge" }}edge{{ else if include "ember.gpu" . }}cuda{{ else }}cpu{{ end }}
{{- end }}

{{- define "ember.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion (include "ember.flavour" .)) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "ember.device" -}}
{{- if eq .Values.mode "edge" }}cpu
{{- else }}{{ default (ternary "cuda" "cpu" (eq (include "ember.gpu" .) "true")) .Values.cloud.device }}
{{- end }}
{{- end }}

{{/* The Deployment's or DaemonSet's kind. */}}
{{- define "ember.workloadKind" -}}
{{- if eq .Values.mode "edge" }}{{ .Values.edge.kind }}{{ else }}Deployment{{ end }}
{{- end }}

{{/* The scheme ember serves and the probes use, and the container/service port's name. */}}
{{- define "ember.scheme" -}}
{{- if .Values.tls.secretName }}https{{ else }}http{{ end }}
{{- end }}

{{/* The Secret holding the API keys: yours, or the one this chart creates. */}}
{{- define "ember.authSecretName" -}}
{{- default (printf "%s-auth" (include "ember.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Drain: preStop sleep, then ember's own grace, then a margin before SIGKILL. */}}
{{- define "ember.terminationGracePeriodSeconds" -}}
{{- add .Values.server.preStopSleepSeconds .Values.server.shutdownGraceSeconds .Values.server.terminationMarginSeconds }}
{{- end }}

{{/* The rules values.schema.json cannot say; every workload template includes this first. */}}
{{- define "ember.validate" -}}
{{- $sources := 0 }}
{{- if .Values.models.pvc.claimName }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.models.volume }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.models.init.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail (printf "models: set exactly one source of the model repository (models.pvc.claimName, models.volume or models.init.enabled); %d are set" (int $sources)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (eq (include "ember.workloadKind" .) "DaemonSet") }}
{{- fail "autoscaling: a DaemonSet runs one pod per node and cannot be autoscaled; set edge.kind=Deployment or autoscaling.enabled=false" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling: maxReplicas is less than minReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.queueDepth.enabled) (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) }}
{{- fail "autoscaling: no metric to scale on; set autoscaling.targetCPUUtilizationPercentage or autoscaling.queueDepth.enabled" }}
{{- end }}
{{- if and .Values.edge.upstreamCA.secretName .Values.edge.upstreamCA.configMapName }}
{{- fail "edge.upstreamCA: set secretName or configMapName, not both" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.apiKeys) }}
{{- fail "auth: set auth.existingSecret, or auth.apiKeys for the chart to create the Secret" }}
{{- end }}
{{- end }}

{{/* The pod template of the Deployment and the DaemonSet. */}}
{{- define "ember.podTemplate" -}}
{{- $gpu := eq (include "ember.gpu" .) "true" }}
{{- $edge := eq .Values.mode "edge" }}
{{- $tier := ternary .Values.edge .Values.cloud $edge }}
{{- $scheme := include "ember.scheme" . }}
{{- $upstreamCA := or .Values.edge.upstreamCA.secretName .Values.edge.upstreamCA.configMapName }}
metadata:
  labels:
    {{- include "ember.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: {{ .Values.mode }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := deepCopy .Values.podAnnotations }}
  {{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
  {{- /* Restart the pods when the keys change: ember reads them once, at start-up. */}}
  {{- $_ := set $annotations "checksum/auth" (include (print $.Template.BasePath "/secret.yaml") . | sha256sum) }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "ember.serviceAccountName" . }}
  # ember never calls the Kubernetes API.
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- if and $gpu .Values.gpu.runtimeClassName }}
  runtimeClassName: {{ .Values.gpu.runtimeClassName }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "ember.terminationGracePeriodSeconds" . }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- $nodeSelector := merge (dict) (ternary .Values.gpu.nodeSelector (dict) $gpu) $tier.nodeSelector }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := concat $tier.tolerations (ternary .Values.gpu.tolerations (list) $gpu) }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $tier.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.models.init.enabled }}
  initContainers:
    - name: models
      image: {{ printf "%s:%s" .Values.models.init.image.repository (default .Chart.AppVersion .Values.models.init.image.tag) }}
      imagePullPolicy: {{ .Values.models.init.image.pullPolicy }}
      {{- with .Values.models.init.command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.models.init.args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        - name: EMBER_MODELS
          value: /models
        {{- with .Values.models.init.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.models.init.resources | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: /models
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: ember
      image: {{ include "ember.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: [{{ ternary "edge" "serve" $edge | quote }}]
      ports:
        - name: {{ $scheme }}
          containerPort: {{ .Values.server.port }}
          protocol: TCP
      env:
        - name: EMBER_ADDR
          value: {{ printf "0.0.0.0:%d" (int .Values.server.port) | quote }}
        - name: EMBER_MODELS
          value: /models
        - name: EMBER_DEVICE
          value: {{ include "ember.device" . | quote }}
        # The same value as terminationGracePeriodSeconds is computed from.
        - name: EMBER_SHUTDOWN_GRACE_SECS
          value: {{ .Values.server.shutdownGraceSeconds | quote }}
        - name: EMBER_LOG_FORMAT
          value: {{ .Values.server.logFormat | quote }}
        - name: EMBER_LOG
          value: {{ .Values.server.logLevel | quote }}
        {{- with .Values.server.computeThreads }}
        - name: EMBER_COMPUTE_THREADS
          value: {{ . | quote }}
        {{- end }}
        {{- with .Values.server.maxConnections }}
        - name: EMBER_MAX_CONNECTIONS
          value: {{ . | quote }}
        {{- end }}
        {{- with .Values.server.requestTimeoutSeconds }}
        - name: EMBER_REQUEST_TIMEOUT_SECS
          value: {{ . | quote }}
        {{- end }}
        {{- with .Values.server.cpuIsa }}
        - name: EMBER_CPU_ISA
          value: {{ . | quote }}
        {{- end }}
        {{- if .Values.auth.enabled }}
        - name: EMBER_API_KEY_FILE
          value: /etc/ember/auth/api-keys
        - name: EMBER_ADMIN_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "ember.authSecretName" . }}
              key: {{ .Values.auth.adminKeyKey }}
              optional: true
        {{- end }}
        {{- if .Values.tls.secretName }}
        - name: EMBER_TLS_CERT
          value: /etc/ember/tls/tls.crt
        - name: EMBER_TLS_KEY
          value: /etc/ember/tls/tls.key
        {{- end }}
        {{- if $edge }}
        - name: EMBER_UPSTREAM
          value: {{ .Values.edge.upstream | quote }}
        {{- with .Values.edge.upstreamApiKey.secretName }}
        - name: EMBER_UPSTREAM_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $.Values.edge.upstreamApiKey.key }}
        {{- end }}
        {{- if $upstreamCA }}
        - name: EMBER_UPSTREAM_CA
          value: /etc/ember/upstream-ca/ca.crt
        {{- end }}
        {{- with .Values.edge.maxModelMB }}
        - name: EMBER_EDGE_MAX_MODEL_MB
          value: {{ . | quote }}
        {{- end }}
        - name: EMBER_SPILLOVER
          value: {{ .Values.edge.spillover | quote }}
        {{- with .Values.edge.spillQueueWaitMs }}
        - name: EMBER_SPILL_QUEUE_WAIT_MS
          value: {{ . | quote }}
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      # Models load after the port opens: the startup probe waits on readiness (generously),
      # then liveness restarts a process that stops answering, and readiness takes a pod out of
      # the Service while it loads or drains.
      startupProbe:
        httpGet:
          path: /health/ready
          port: {{ $scheme }}
          scheme: {{ upper $scheme }}
        {{- toYaml .Values.probes.startup | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /health/live
          port: {{ $scheme }}
          scheme: {{ upper $scheme }}
        {{- toYaml .Values.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /health/ready
          port: {{ $scheme }}
          scheme: {{ upper $scheme }}
        {{- toYaml .Values.probes.readiness | nindent 8 }}
      {{- if gt (int .Values.server.preStopSleepSeconds) 0 }}
      # The pod leaves the Service's endpoints when it starts terminating; the sleep gives that
      # time to reach every proxy before SIGTERM starts ember's drain.
      lifecycle:
        preStop:
          exec:
            command: ["sleep", {{ .Values.server.preStopSleepSeconds | quote }}]
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- include "ember.resources" . | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: /models
          readOnly: true
          {{- with .Values.models.pvc.subPath }}
          subPath: {{ . }}
          {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- if .Values.auth.enabled }}
        - name: auth
          mountPath: /etc/ember/auth
          readOnly: true
        {{- end }}
        {{- if .Values.tls.secretName }}
        - name: tls
          mountPath: /etc/ember/tls
          readOnly: true
        {{- end }}
        {{- if and $edge $upstreamCA }}
        - name: upstream-ca
          mountPath: /etc/ember/upstream-ca
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: models
      {{- if .Values.models.pvc.claimName }}
      persistentVolumeClaim:
        claimName: {{ .Values.models.pvc.claimName }}
        readOnly: true
      {{- else if .Values.models.volume }}
      {{- toYaml .Values.models.volume | nindent 6 }}
      {{- else }}
      emptyDir:
        {{- toYaml .Values.models.emptyDir | nindent 8 }}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 256Mi
    {{- if .Values.auth.enabled }}
    - name: auth
      secret:
        secretName: {{ include "ember.authSecretName" . }}
        defaultMode: 0440
        items:
          - key: {{ .Values.auth.apiKeysKey }}
            path: api-keys
    {{- end }}
    {{- if .Values.tls.secretName }}
    - name: tls
      secret:
        secretName: {{ .Values.tls.secretName }}
        defaultMode: 0440
    {{- end }}
    {{- if and $edge $upstreamCA }}
    - name: upstream-ca
      {{- if .Values.edge.upstreamCA.secretName }}
      secret:
        secretName: {{ .Values.edge.upstreamCA.secretName }}
      {{- else }}
      configMap:
        name: {{ .Values.edge.upstreamCA.configMapName }}
      {{- end }}
        items:
          - key: {{ .Values.edge.upstreamCA.key }}
            path: ca.crt
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The tier's resources, plus the GPUs (requested and limited alike) on the GPU cloud tier. */}}
{{- define "ember.resources" -}}
{{- $res := deepCopy (ternary .Values.edge.resources .Values.cloud.resources (eq .Values.mode "edge")) }}
{{- if include "ember.gpu" . }}
{{- $gpus := dict .Values.gpu.resourceName (toString .Values.gpu.count) }}
{{- $_ := set $res "requests" (merge (deepCopy $gpus) (default (dict) $res.requests)) }}
{{- $_ := set $res "limits" (merge (deepCopy $gpus) (default (dict) $res.limits)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}
