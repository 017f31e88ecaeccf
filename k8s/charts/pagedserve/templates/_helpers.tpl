{{/* Chart name, overridable with nameOverride. */}}
{{- define "pagedserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix: <release>-<chart> unless the release name already contains it. */}}
{{- define "pagedserve.fullname" -}}
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

{{/* Component names (truncated so that suffixes still fit in 63 characters). */}}
{{- define "pagedserve.gateway.fullname" -}}
{{- printf "%s-gateway" (include "pagedserve.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- define "pagedserve.scheduler.fullname" -}}
{{- printf "%s-scheduler" (include "pagedserve.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}
{{- define "pagedserve.executor.fullname" -}}
{{- printf "%s-executor" (include "pagedserve.fullname" . | trunc 53 | trimSuffix "-") }}
{{- end }}

{{/* host:port of the scheduler Service, as gateways and executors dial it. */}}
{{- define "pagedserve.scheduler.address" -}}
{{- printf "%s.%s.svc:%d" (include "pagedserve.scheduler.fullname" .) .Release.Namespace (int .Values.scheduler.port) }}
{{- end }}

{{- define "pagedserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels. */}}
{{- define "pagedserve.labels" -}}
helm.sh/chart: {{ include "pagedserve.chart" . }}
{{ include "pagedserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pagedserve
{{- end }}

{{/* Selector labels shared by all components; add app.kubernetes.io/component per workload. */}}
{{- define "pagedserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pagedserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Per-component selector labels: include with (dict "ctx" $ "component" "gateway"). */}}
{{- define "pagedserve.componentSelectorLabels" -}}
{{ include "pagedserve.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pagedserve.componentLabels" -}}
{{ include "pagedserve.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pagedserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pagedserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: include with (dict "ctx" $ "variant" "control"|"cpu"|"cuda"). */}}
{{- define "pagedserve.image" -}}
{{- $img := index .ctx.Values.images .variant }}
{{- $tag := default (printf "%s-%s" .ctx.Chart.AppVersion .variant) $img.tag }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}

{{- define "pagedserve.imagePullPolicy" -}}
{{- (index .ctx.Values.images .variant).pullPolicy }}
{{- end }}

{{/* Environment shared by every container. HOME and the caches point at the emptyDirs. */}}
{{- define "pagedserve.commonEnv" -}}
- name: PAGEDSERVE_HOST
  value: "0.0.0.0"
- name: PAGEDSERVE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: PAGEDSERVE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /cache
- name: TRITON_CACHE_DIR
  value: /cache/triton
- name: HF_HOME
  value: /cache/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
{{ include "pagedserve.internalAuthEnv" . }}
{{- end }}

{{/* Writable scratch volumes (the root filesystem is read-only). */}}
{{- define "pagedserve.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.cacheSizeLimit }}
{{- end }}

{{- define "pagedserve.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- end }}

{{/* Values this chart version added. `helm upgrade --reuse-values` renders with the previous
release's chart defaults instead of this values.yaml, so coming from an older chart they are
absent: refuse, saying what to do, instead of failing on a nil pointer (or rendering without
internal authentication). Include at the top of every template that reads them. */}}
{{- define "pagedserve.checkValues" -}}
{{- $missing := list }}
{{- if not (hasKey .Values "internalAuth") }}
{{- $missing = append $missing "internalAuth" }}
{{- end }}
{{- range $role := list "gateway" "scheduler" "executor" }}
{{- if not (hasKey $.Values.tls $role) }}
{{- $missing = append $missing (printf "tls.%s" $role) }}
{{- end }}
{{- end }}
{{- range $key := list "dns" "extraEgress" }}
{{- if not (hasKey $.Values.networkPolicy $key) }}
{{- $missing = append $missing (printf "networkPolicy.%s" $key) }}
{{- end }}
{{- end }}
{{- with $missing }}
{{- fail (printf "values lack %s, which this chart version added: `helm upgrade --reuse-values` keeps the previous chart's defaults; upgrade with --reset-then-reuse-values" (join ", " .)) }}
{{- end }}
{{- end }}

{{/* Internal authentication (values internalAuth.*). The Secret every pod reads
PAGEDSERVE_INTERNAL_SECRET from: internalAuth.existingSecret, else the one the chart manages. */}}
{{- define "pagedserve.internalAuth.secretName" -}}
{{- default (printf "%s-internal-auth" (include "pagedserve.fullname" . | trunc 49 | trimSuffix "-")) .Values.internalAuth.existingSecret }}
{{- end }}

{{/* The value of the chart-managed internal secret: the one already in the cluster (lookup:
`helm upgrade` keeps it; `helm template` and `helm lint` see no cluster and get a fresh one),
else 64 random letters and digits (crypto/rand, ~380 bits). Include with the top-level context:
the value is chosen once per render and kept on it (every template of a render shares that
map, and no value a user sets can reach it), so the Secret and the pods' checksum annotation
agree. */}}
{{- define "pagedserve.internalAuth.generatedValue" -}}
{{- $memo := "pagedserveGeneratedInternalSecret" }}
{{- if not (hasKey . $memo) }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "pagedserve.internalAuth.secretName" .) }}
{{- $value := dig "data" .Values.internalAuth.secretKey "" (default (dict) $existing) | b64dec }}
{{- if lt (len $value) 32 }}
{{- $value = randAlphaNum 64 }}
{{- end }}
{{- $_ := set . $memo $value }}
{{- end }}
{{- index . $memo }}
{{- end }}

{{/* The internal secret's variable (--internal-secret), for every container. */}}
{{- define "pagedserve.internalAuthEnv" -}}
- name: PAGEDSERVE_INTERNAL_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "pagedserve.internalAuth.secretName" . }}
      key: {{ required "internalAuth.secretKey must name the key holding the internal secret" .Values.internalAuth.secretKey }}
{{- end }}

{{/* Pod annotations: include with (dict "ctx" $ "extra" .Values.<component>.podAnnotations).
With the chart-managed internal secret, checksum/internal-secret (a SHA-256 of its value, which
is random, so the hash gives nothing away) restarts every pod together when the value changes:
pods read it at start, and a partial restart would leave pods that refuse each other. A Secret
you supply gets none (the chart cannot read it); restart the workloads when you rotate it. */}}
{{- define "pagedserve.podAnnotations" -}}
{{- $annotations := deepCopy (default (dict) .extra) }}
{{- if not .ctx.Values.internalAuth.existingSecret }}
{{- $_ := set $annotations "checksum/internal-secret" (include "pagedserve.internalAuth.generatedValue" .ctx | sha256sum) }}
{{- end }}
{{- with $annotations }}
{{- dict "annotations" . | toYaml }}
{{- end }}
{{- end }}

{{/* TLS (values tls.*): the role's Secret's files as the --tls-cert-file / --tls-key-file /
--tls-ca-file flags, the volume and its read-only mount. Each renders nothing while
tls.enabled is false. */}}
{{- define "pagedserve.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: PAGEDSERVE_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
- name: PAGEDSERVE_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
- name: PAGEDSERVE_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
{{- end }}
{{- end }}

{{/* The Secret holding a role's certificate: include with (dict "ctx" $ "role" "gateway").
tls.<role>.existingSecret (a certificate with CN pagedserve-<role>, which binds the role), else
the shared tls.existingSecret. */}}
{{- define "pagedserve.tls.secretName" -}}
{{- $own := (index .ctx.Values.tls .role).existingSecret }}
{{- required (printf "tls.%s.existingSecret or tls.existingSecret is required when tls.enabled is true" .role) (default .ctx.Values.tls.existingSecret $own) }}
{{- end }}

{{/* include with (dict "ctx" $ "role" "gateway"). */}}
{{- define "pagedserve.tlsVolume" -}}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "pagedserve.tls.secretName" . }}
{{- end }}
{{- end }}

{{- define "pagedserve.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The scheme of the gateway's HTTP port: with TLS on, the gateway serves HTTPS too. */}}
{{- define "pagedserve.httpScheme" -}}
{{- ternary "HTTPS" "HTTP" .Values.tls.enabled }}
{{- end }}

{{/* Handler of a probe on an internal gRPC port: include with (dict "ctx" $ "port" N).
Kubernetes gRPC probes speak plaintext only, so with TLS on they become TCP probes (the port is
open once the service serves: an executor listens only after loading its model). */}}
{{- define "pagedserve.grpcProbeHandler" -}}
{{- if .ctx.Values.tls.enabled }}
tcpSocket:
  port: {{ .port }}
{{- else }}
grpc:
  port: {{ .port }}
{{- end }}
{{- end }}
