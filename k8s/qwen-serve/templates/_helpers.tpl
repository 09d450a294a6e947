{{/*
Names and labels. Selector labels are minimal and stable (name, instance, component, model):
Deployment selectors are immutable, so nothing a user sets ever goes into them.
*/}}

{{- define "qwen-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qwen-serve.fullname" -}}
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

{{- define "qwen-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qwen-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwen-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qwen-serve.labels" -}}
helm.sh/chart: {{ include "qwen-serve.chart" . }}
{{ include "qwen-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qwen-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Proxy: name and selector labels. */}}
{{- define "qwen-serve.proxy.fullname" -}}
{{- printf "%s-proxy" (include "qwen-serve.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "qwen-serve.proxy.selectorLabels" -}}
{{ include "qwen-serve.selectorLabels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{/* Engine: `dict "root" $ "name" <profile name>`. */}}
{{- define "qwen-serve.engine.fullname" -}}
{{- printf "%s-%s" (include "qwen-serve.fullname" .root | trunc 30 | trimSuffix "-") .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The headless Service of one model: `dict "root" $ "name" <profile name>`. Its DNS name resolves
to every ready vLLM pod of the model, one address each: the proxy's discovery.
*/}}
{{- define "qwen-serve.engine.headlessName" -}}
{{- printf "%s-headless" (include "qwen-serve.engine.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* The proxy's backend URL for one model: its headless Service's DNS name. `dict "root" $ "name" <profile name>` */}}
{{- define "qwen-serve.engine.discoveryURL" -}}
{{- printf "http://%s.%s.svc:8000" (include "qwen-serve.engine.headlessName" .) .root.Release.Namespace }}
{{- end }}

{{/* Every engine pod of the release (NetworkPolicy, PodMonitor). */}}
{{- define "qwen-serve.engine.componentLabels" -}}
{{ include "qwen-serve.selectorLabels" . }}
app.kubernetes.io/component: engine
{{- end }}

{{/* The pods of one model: `dict "root" $ "name" <profile name>`. */}}
{{- define "qwen-serve.engine.selectorLabels" -}}
{{ include "qwen-serve.engine.componentLabels" .root }}
qwen-serve.io/model: {{ .name }}
{{- end }}

{{- define "qwen-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qwen-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* `dict "image" .Values.images.engine "root" $` */}}
{{- define "qwen-serve.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "qwen-serve.cacheClaimName" -}}
{{- default (printf "%s-model-cache" (include "qwen-serve.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}

{{/*
The enabled models, resolved once: the generated block (files/profiles.yaml, or the user's
profileOverride printed by `python -m deploy chart-profiles --values`), the engine settings
merged for the model, and the pod layout. Returned as YAML: `include ... | fromYaml`.
Every refusal is here, with the model, the numbers and what to do.
*/}}
{{- define "qwen-serve.models" -}}
{{- $shipped := (.Files.Get "files/profiles.yaml" | fromYaml).profiles | default dict }}
{{- $known := keys $shipped | sortAlpha | join ", " }}
{{- $out := dict }}
{{- range $name, $model := .Values.models }}
{{- if $model.enabled }}
{{- $block := $model.profileOverride | default (index $shipped $name) }}
{{- if not $block }}
{{- fail (printf "models.%s: unknown model profile %q. Known profiles: %s. For a profile of your own, generate its block with `python -m deploy chart-profiles --profile path/to/%s.yaml --values`." $name $name $known $name) }}
{{- end }}
{{- if ne $block.name $name }}
{{- fail (printf "models.%s.profileOverride is the block of profile %q: put it under models.%s, or regenerate it with `python -m deploy chart-profiles --profile %s --values`." $name $block.name $block.name $name) }}
{{- end }}
{{- $engine := mergeOverwrite (deepCopy $.Values.engine) ($model.engine | default dict) }}
{{- /* The server the block runs: vLLM or SGLang (blocks generated before `engine` existed are vLLM's). */}}
{{- $engineName := $block.engine | default ($block.profile | default dict).engine | default "vllm" }}
{{- if not (has $engineName (list "vllm" "sglang")) }}
{{- fail (printf "models.%s: engine %q: the chart runs vllm or sglang; regenerate the block with `python -m deploy chart-profiles --profile %s --values`." $name $engineName $name) }}
{{- end }}
{{- $image := get ($engine.images | default dict) $engineName | default dict }}
{{- if eq $engineName "vllm" }}
{{- $image = mergeOverwrite (deepCopy $.Values.images.engine) $image }}
{{- else if not (and $image.repository $image.tag) }}
{{- fail (printf "models.%s: profile engine %s needs an image: set engine.images.%s.repository and .tag (e.g. lmsysorg/sglang, v0.5.23)." $name $engineName $engineName) }}
{{- end }}
{{- $module := $block.serverModule | default (ternary "sglang.launch_server" "vllm.entrypoints.openai.api_server" (eq $engineName "sglang")) }}
{{- $server := dict "engine" $engineName "image" $image "module" $module }}
{{- $replicas := 1 }}
{{- if hasKey $model "replicas" }}
{{- $replicas = int $model.replicas }}
{{- end }}
{{- $perNode := int (($model.engine | default dict).gpusPerNode | default $block.gpusPerNode | default $.Values.engine.gpusPerNode) }}
{{- $world := int $block.worldSize }}
{{- $layout := dict "multiNode" false "nodes" 1 "gpusPerPod" $world }}
{{- if gt $world $perNode }}
{{- if eq $engineName "sglang" }}
{{- fail (printf "models.%s: tensor %d x pipeline %d = %d GPUs, but a node has %d (gpusPerNode), and an SGLang profile runs in one pod (the kit renders no multi-node SGLang). Lower the parallelism or raise gpusPerNode, or serve the model with engine vllm and executor ray." $name (int $block.tensor) (int $block.pipeline) $world $perNode) }}
{{- end }}
{{- if ne $block.executor "ray" }}
{{- fail (printf "models.%s: tensor %d x pipeline %d = %d GPUs, but a node has %d (gpusPerNode) and the profile's executor is %q, which runs on one node. Lower the parallelism, raise gpusPerNode, or use executor ray: python -m deploy chart-profiles --profile %s --set parallelism.executor=ray --values" $name (int $block.tensor) (int $block.pipeline) $world $perNode $block.executor $name) }}
{{- end }}
{{- if mod $world $perNode }}
{{- fail (printf "models.%s: tensor %d x pipeline %d = %d GPUs do not split evenly over nodes of %d GPUs (gpusPerNode)." $name (int $block.tensor) (int $block.pipeline) $world $perNode) }}
{{- end }}
{{- if ne $replicas 1 }}
{{- fail (printf "models.%s: replicas %d: a multi-node model (%d GPUs over nodes of %d) is one RayCluster; set replicas: 1." $name $replicas $world $perNode) }}
{{- end }}
{{- $layout = dict "multiNode" true "nodes" (div $world $perNode) "gpusPerPod" $perNode }}
{{- end }}
{{- $scaling := $engine.autoscaling | default dict }}
{{- if $scaling.enabled }}
{{- if $layout.multiNode }}
{{- fail (printf "models.%s: engine.autoscaling is for models in one pod (a Deployment); this one spans %d nodes as one RayCluster, and more Ray workers would not make another replica (tensor x pipeline is fixed). Set models.%s.engine.autoscaling.enabled=false." $name (int $layout.nodes) $name) }}
{{- end }}
{{- if not $scaling.serverAddress }}
{{- fail (printf "models.%s: engine.autoscaling.enabled needs engine.autoscaling.serverAddress, the Prometheus KEDA queries, e.g. http://prometheus-operated.monitoring.svc:9090" $name) }}
{{- end }}
{{- if gt (int $scaling.minReplicas) (int $scaling.maxReplicas) }}
{{- fail (printf "models.%s: engine.autoscaling.minReplicas (%d) is above maxReplicas (%d)." $name (int $scaling.minReplicas) (int $scaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- /*
LoRA adapters (the profile's lora.adapters): `path` is where the pod reads one from the model
cache volume (a local adapter: <mountPath>/adapters/<name>, or models.<name>.adapterPaths), empty
for a hub id, which the adapters init container downloads into HF_HOME like the model.
*/}}
{{- $declared := list }}
{{- range (($block.profile | default dict).lora | default dict).adapters }}
{{- $declared = append $declared .name }}
{{- end }}
{{- $paths := $model.adapterPaths | default dict }}
{{- range $adapter, $ignored := $paths }}
{{- if not (has $adapter $declared) }}
{{- fail (printf "models.%s.adapterPaths.%s: profile %s has no LoRA adapter %q (%s)." $name $adapter $name $adapter (ternary "it declares no lora: adapters" (printf "its adapters: %s" (join ", " $declared)) (empty $declared))) }}
{{- end }}
{{- end }}
{{- $mount := trimSuffix "/" $.Values.modelCache.mountPath }}
{{- $adapters := list }}
{{- range (($block.profile | default dict).lora | default dict).adapters }}
{{- $path := "" }}
{{- if hasKey $paths .name }}
{{- $path = printf "%s/%s" $mount (index $paths .name) }}
{{- else if or (hasPrefix "/" .source) (hasPrefix "." .source) .generator }}
{{- $path = printf "%s/adapters/%s" $mount .name }}
{{- end }}
{{- $adapters = append $adapters (dict "name" .name "source" .source "path" $path) }}
{{- end }}
{{- $_ := set $out $name (dict "block" $block "engine" $engine "replicas" $replicas "layout" $layout "hubIdName" $model.hubIdName "adapters" $adapters "server" $server) }}
{{- end }}
{{- end }}
{{- if not $out }}
{{- fail (printf "no model is enabled: set models.<profile>.enabled=true for one of: %s" $known) }}
{{- end }}
{{- /*
The proxy's hub-id rule (serving/config.py _hub_id_owners), checked here so that `helm install`
fails instead of a crash-looping proxy: of the enabled models sharing a hub id (a model that is
not a local path), those with hubIdName true answer to it, else those with it unset; more than
one is refused.
*/}}
{{- $claims := dict }}
{{- range $name, $m := $out }}
{{- $model := $m.block.model }}
{{- if not (or (hasPrefix "/" $model) (hasPrefix "." $model) ($m.block.profile | default dict).generator) }}
{{- $_ := set $claims $model (append (get $claims $model | default list) $name) }}
{{- end }}
{{- end }}
{{- range $hub, $names := $claims }}
{{- $said := list }}
{{- $open := list }}
{{- range $names }}
{{- $v := (index $out .).hubIdName }}
{{- if kindIs "bool" $v }}
{{- if $v }}
{{- $said = append $said . }}
{{- end }}
{{- else }}
{{- $open = append $open . }}
{{- end }}
{{- end }}
{{- $chosen := $said | default $open }}
{{- if gt (len $chosen) 1 }}
{{- $models := list }}
{{- $keys := list }}
{{- range $chosen }}
{{- $models = append $models (printf "models.%s" .) }}
{{- $keys = append $keys (printf "models.%s.hubIdName=true" .) }}
{{- end }}
{{- $two := eq (len $chosen) 2 }}
{{- $why := ternary "neither sets hubIdName" "none of them sets hubIdName" $two }}
{{- if $said }}
{{- $why = ternary "both set hubIdName: true" "each sets hubIdName: true" $two }}
{{- end }}
{{- fail (printf "%s serve the same hub id %s and %s, so %q would name either and the proxy would refuse to start: set %s, whichever answers to it (false on the %s)." (join " and " $models) $hub $why $hub (join " or " $keys) (ternary "other" "others" $two)) }}
{{- end }}
{{- end }}
{{- toYaml (dict "models" $out) }}
{{- end }}

{{/* The engine container's environment: `dict "root" $ "m" <resolved model>`. */}}
{{- define "qwen-serve.engine.env" -}}
{{- range $k, $v := .m.block.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- if eq .m.server.engine "sglang" }}
# SGLang's image has no home for uid 1000 (engine.podSecurityContext): its JIT and compile caches go to /tmp.
- name: HOME
  value: /tmp
{{- end }}
- name: HF_HOME
  value: {{ .root.Values.modelCache.mountPath | quote }}
{{- if .root.Values.huggingface.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with .m.engine.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* CPU/memory from values plus nvidia.com/gpu = GPUs per pod. `dict "m" <resolved model>` */}}
{{- define "qwen-serve.engine.resources" -}}
{{- $res := deepCopy (.m.engine.resources | default dict) }}
{{- $requests := $res.requests | default dict }}
{{- $limits := $res.limits | default dict }}
{{- $gpus := int .m.layout.gpusPerPod }}
{{- $_ := set $requests "nvidia.com/gpu" $gpus }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- toYaml (dict "requests" $requests "limits" $limits) }}
{{- end }}

{{/* What the init containers share: the cache, HF_HOME, the hub token. `dict "root" $ "m" <resolved model>` */}}
{{- define "qwen-serve.engine.cacheAccess" -}}
env:
  - name: HF_HOME
    value: {{ .root.Values.modelCache.mountPath | quote }}
  {{- if .root.Values.huggingface.tokenSecretName }}
  - name: HF_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ .root.Values.huggingface.tokenSecretName }}
        key: {{ .root.Values.huggingface.tokenSecretKey }}
  {{- end }}
volumeMounts:
  - name: model-cache
    mountPath: {{ .root.Values.modelCache.mountPath }}
securityContext: {{- toYaml .m.engine.securityContext | nindent 2 }}
{{- with .root.Values.modelCache.download.resources }}
resources: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The init containers filling the Hugging Face cache once: `download` fetches the model (hub ids
only); `adapters` fetches hub LoRA adapters into the same cache (vLLM resolves their hub ids
there, as it does the model's) and checks that adapters read from the cache volume are there,
so a missing one fails the pod before vLLM loads the weights. `dict "root" $ "m" <resolved model> "name" <profile name>`
*/}}
{{- define "qwen-serve.engine.download" -}}
{{- $model := .m.block.model }}
{{- $download := .root.Values.modelCache.download.enabled }}
{{- if and $download (not (hasPrefix "/" $model)) (not (hasPrefix "." $model)) }}
- name: download
  image: {{ include "qwen-serve.image" (dict "image" .m.server.image "root" .root) }}
  imagePullPolicy: {{ .m.server.image.pullPolicy }}
  command: ["hf", "download", {{ $model | quote }}]
  {{- with .root.Values.modelCache.download.extraArgs }}
  args: {{ toJson . }}
  {{- end }}
  {{- include "qwen-serve.engine.cacheAccess" . | nindent 2 }}
{{- end }}
{{- $steps := list }}
{{- range .m.adapters }}
{{- if .path }}
{{- $steps = concat $steps (list "check" .name .path) }}
{{- else if $download }}
{{- $steps = concat $steps (list "fetch" .name .source) }}
{{- end }}
{{- end }}
{{- if $steps }}
- name: adapters
  image: {{ include "qwen-serve.image" (dict "image" .m.server.image "root" .root) }}
  imagePullPolicy: {{ .m.server.image.pullPolicy }}
  command:
    - /bin/sh
    - -c
    - |
      set -eu
      while [ "$#" -gt 0 ]; do
        step=$1 name=$2 where=$3
        shift 3
        if [ "$step" = fetch ]; then
          echo "LoRA adapter $name: hf download $where"
          hf download "$where"
        elif [ -f "$where/adapter_config.json" ]; then
          echo "LoRA adapter $name: $where"
        else
          echo "error: LoRA adapter $name of models.{{ .name }} (the profile's lora.adapters): no $where/adapter_config.json on the model cache volume (claim {{ include "qwen-serve.cacheClaimName" .root }}). Copy the adapter's directory (adapter_config.json and its weights) to $where, or set models.{{ .name }}.adapterPaths.$name to the directory holding it, relative to {{ .root.Values.modelCache.mountPath }}." >&2
          exit 1
        fi
      done
    - adapters
  # (check|fetch, adapter name, directory in the pod | hub id) per adapter.
  args: {{- toYaml $steps | nindent 4 }}
  {{- include "qwen-serve.engine.cacheAccess" . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The engine argv: the generated args, except that each --lora-modules (vLLM) or --lora-paths
(SGLang) entry of an adapter read from the cache volume names its directory in the pod (the
generated block names it where `deploy render` ran). Hub adapters keep their hub id, which both
engines resolve in HF_HOME. `dict "m" <resolved model>`
*/}}
{{- define "qwen-serve.engine.args" -}}
{{- $paths := dict }}
{{- range .m.adapters }}
{{- if .path }}
{{- $_ := set $paths .name .path }}
{{- end }}
{{- end }}
{{- $args := list }}
{{- $modules := false }}
{{- $prefix := ternary "lora_" "" (eq .m.server.engine "sglang") }}
{{- range .m.block.args }}
{{- if and $modules (hasPrefix "{" .) }}
{{- $module := fromJson . }}
{{- $adapter := get $module (printf "%sname" $prefix) }}
{{- if hasKey $paths $adapter }}
{{- $_ := set $module (printf "%spath" $prefix) (get $paths $adapter) }}
{{- $args = append $args (toJson $module) }}
{{- else }}
{{- $args = append $args . }}
{{- end }}
{{- else }}
{{- $modules = has . (list "--lora-modules" "--lora-paths") }}
{{- $args = append $args . }}
{{- end }}
{{- end }}
{{- toYaml $args }}
{{- end }}

{{/*
Probes on the engine's /health: vLLM's, or SGLang's (503 while it starts; when idle it runs a
one-token generation, as /health_generate always does). `dict "m" <resolved model>`
*/}}
{{- define "qwen-serve.engine.probes" -}}
{{- range $kind := list "startupProbe" "readinessProbe" "livenessProbe" }}
{{- $p := index $.m.engine $kind }}
{{ $kind }}:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ $p.periodSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
{{- end }}
{{- end }}

{{/* Volumes every engine pod has. `dict "root" $ "m" <resolved model>` */}}
{{- define "qwen-serve.engine.volumes" -}}
- name: model-cache
  persistentVolumeClaim:
    claimName: {{ include "qwen-serve.cacheClaimName" .root }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .m.engine.shm.sizeLimit }}
{{- end }}

{{- define "qwen-serve.engine.volumeMounts" -}}
- name: model-cache
  mountPath: {{ .root.Values.modelCache.mountPath }}
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* Scheduling of engine pods. `dict "root" $ "m" <resolved model>` */}}
{{- define "qwen-serve.engine.scheduling" -}}
serviceAccountName: {{ include "qwen-serve.serviceAccountName" .root }}
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .m.engine.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .m.engine.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .m.engine.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .m.engine.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- toYaml .m.engine.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .m.engine.terminationGracePeriodSeconds }}
{{- end }}

{{/*
The proxy's shutdown: the grace period (pod deletion -> SIGKILL) must cover the preStop pause,
then the drain (proxy.yaml drain_seconds), then $margin seconds for the process to exit.
null derives it; a lower value is refused, since SIGKILL would cut streams the drain may finish.
*/}}
{{- define "qwen-serve.proxy.gracePeriod" -}}
{{- $proxy := .Values.proxy }}
{{- $margin := 5 }}
{{- $needed := add (int $proxy.preStop.sleepSeconds) (ceil $proxy.drainSeconds | int) $margin }}
{{- $grace := $proxy.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- $needed }}
{{- else if lt (int $grace) (int $needed) }}
{{- fail (printf "proxy.terminationGracePeriodSeconds (%d) must be at least proxy.preStop.sleepSeconds (%d) + proxy.drainSeconds (%v) + %d s for the proxy to exit = %d: Kubernetes would kill the proxy while it still finishes requests. Raise it to %d, leave it null to derive it, or lower proxy.drainSeconds." (int $grace) (int $proxy.preStop.sleepSeconds) $proxy.drainSeconds $margin (int $needed) (int $needed)) }}
{{- else }}
{{- int $grace }}
{{- end }}
{{- end }}

{{/*
The proxy container's preStop pause: it keeps serving while its endpoint removal reaches
kube-proxy and the ingress controllers, before the kubelet sends SIGTERM. Empty when disabled.
*/}}
{{- define "qwen-serve.proxy.lifecycle" -}}
{{- $pause := .Values.proxy.preStop }}
{{- if gt (int $pause.sleepSeconds) 0 }}
{{- if eq $pause.action "sleep" }}
{{- if not (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "proxy.preStop.action sleep needs Kubernetes 1.30 or later (the PodLifecycleSleepAction feature is on by default from 1.30); this cluster is %s: set proxy.preStop.action=exec, which runs `sleep %d` in the proxy container." .Capabilities.KubeVersion.Version (int $pause.sleepSeconds)) }}
{{- end }}
preStop:
  sleep:
    seconds: {{ int $pause.sleepSeconds }}
{{- else }}
preStop:
  exec:
    command: ["sleep", {{ int $pause.sleepSeconds | quote }}]
{{- end }}
{{- end }}
{{- end }}

{{/*
The proxy's in-cluster paths an Ingress path would publish, as "host path -> internal path"
lines (empty: none). Prefix matches whole path elements (Kubernetes' rule); ImplementationSpecific
is taken as a plain string prefix, as ingress-nginx reads it.
*/}}
{{- define "qwen-serve.proxy.ingressLeaks" -}}
{{- $ingress := .Values.proxy.ingress }}
{{- if $ingress.enabled }}
{{- range $host := $ingress.hosts }}
{{- range ($host.paths | default $ingress.paths) }}
{{- $path := .path }}
{{- $type := .pathType }}
{{- range $internal := list "/metrics" "/ready" "/health" }}
{{- $exact := eq $path $internal }}
{{- $prefix := and (eq $type "Prefix") (hasPrefix (printf "%s/" (trimSuffix "/" $path)) $internal) }}
{{- $loose := and (eq $type "ImplementationSpecific") (hasPrefix $path $internal) }}
{{- if or $exact $prefix $loose }}
{{ $host.host }}{{ $path }} ({{ $type }}) -> {{ $internal }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
