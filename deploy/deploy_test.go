// Package deploy holds expertmesh's Kubernetes manifests (kustomize base
// and overlays) and the Dockerfile. It is its own module so that its
// test's dependencies (kustomize, the Kubernetes API types) stay out of
// expertmesh's.
package deploy

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/resmap"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	"github.com/expertmesh/expertmesh/cli"
)

var dirs = []string{"kustomize/base", "kustomize/overlays/dev", "kustomize/overlays/deepseek-v2"}

func build(t *testing.T, dir string) resmap.ResMap {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	return m
}

// strict decodes a rendered object into its API type, refusing unknown
// fields: a misspelt field is an error here, not silently ignored by the
// API server.
func strict(t *testing.T, obj map[string]any, into any) {
	t.Helper()
	b, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(into); err != nil {
		t.Fatalf("%s/%s: %v", obj["kind"], obj["metadata"].(map[string]any)["name"], err)
	}
}

// TestManifests renders the base and every overlay and checks what a
// cluster operator relies on: every object is a valid API object, every
// pod runs non-root with no capabilities and a read-only root, has
// explicit resources and separate liveness and readiness probes, every
// StatefulSet has a headless Service, and every expertmesh container's
// flags are ones the binary accepts.
func TestManifests(t *testing.T) {
	for _, dir := range dirs {
		t.Run(dir, func(t *testing.T) {
			m := build(t, dir)
			services := map[string]corev1.Service{}
			var pods []podSpec
			kinds := map[string]int{}
			for _, r := range m.Resources() {
				obj, err := r.Map()
				if err != nil {
					t.Fatal(err)
				}
				kinds[r.GetKind()]++
				switch r.GetKind() {
				case "Service":
					var s corev1.Service
					strict(t, obj, &s)
					services[s.Name] = s
				case "StatefulSet":
					var s appsv1.StatefulSet
					strict(t, obj, &s)
					pods = append(pods, podSpec{name: s.Name, spec: s.Spec.Template.Spec, service: s.Spec.ServiceName})
				case "Deployment":
					var d appsv1.Deployment
					strict(t, obj, &d)
					pods = append(pods, podSpec{name: d.Name, spec: d.Spec.Template.Spec})
				case "PodDisruptionBudget":
					var p policyv1.PodDisruptionBudget
					strict(t, obj, &p)
				case "PersistentVolumeClaim":
					var p corev1.PersistentVolumeClaim
					strict(t, obj, &p)
				case "Namespace":
					var n corev1.Namespace
					strict(t, obj, &n)
				default:
					t.Errorf("unexpected kind %s", r.GetKind())
				}
			}
			if len(pods) != 4 {
				t.Fatalf("%d workloads (%v), want etcd, coordinator, attn, expert", len(pods), kinds)
			}
			for _, p := range pods {
				p.check(t, services)
			}
		})
	}
}

type podSpec struct {
	name, service string
	spec          corev1.PodSpec
}

func (p podSpec) check(t *testing.T, services map[string]corev1.Service) {
	t.Helper()
	if p.service != "" {
		s, ok := services[p.service]
		if !ok || s.Spec.ClusterIP != corev1.ClusterIPNone {
			t.Errorf("%s: StatefulSet's service %q is missing or not headless", p.name, p.service)
		}
	}
	sc := p.spec.SecurityContext
	if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.SeccompProfile == nil {
		t.Errorf("%s: pod must run as non-root with a seccomp profile", p.name)
	}
	all := append(slices.Clone(p.spec.InitContainers), p.spec.Containers...)
	for _, c := range all {
		where := p.name + "/" + c.Name
		csc := c.SecurityContext
		if csc == nil || csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation ||
			csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem ||
			csc.Capabilities == nil || !slices.Contains(csc.Capabilities.Drop, "ALL") {
			t.Errorf("%s: want no privilege escalation, a read-only root and every capability dropped", where)
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("%s: explicit cpu and memory requests and a memory limit are required", where)
		}
		if c.Image == "expertmesh" || strings.HasPrefix(c.Image, "expertmesh:") {
			checkFlags(t, where, c.Args)
		}
	}
	for _, c := range p.spec.Containers {
		lp, rp := c.LivenessProbe, c.ReadinessProbe
		if lp == nil || rp == nil || lp.HTTPGet == nil || rp.HTTPGet == nil || lp.HTTPGet.Path == rp.HTTPGet.Path {
			t.Errorf("%s/%s: want separate HTTP liveness and readiness probes", p.name, c.Name)
		}
	}
}

// checkFlags runs the binary's own flag parsing on a container's args
// (with --help, so nothing starts): an unknown flag or subcommand fails.
func checkFlags(t *testing.T, where string, args []string) {
	t.Helper()
	if len(args) == 0 {
		t.Errorf("%s: no subcommand", where)
		return
	}
	var out, errb bytes.Buffer
	cli.Main(append(slices.Clone(args), "--help"), &out, &errb)
	msg := errb.String()
	for _, bad := range []string{"not defined", "unknown command", "invalid value"} {
		if strings.Contains(msg, bad) {
			t.Errorf("%s: expertmesh %s: %s", where, strings.Join(args, " "), firstLine(msg))
		}
	}
	if !strings.Contains(msg, "Usage of expertmesh "+args[0]) {
		t.Errorf("%s: expertmesh %s --help printed no usage: %s", where, args[0], firstLine(msg))
	}
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// TestOverlays checks what each overlay is for.
func TestOverlays(t *testing.T) {
	get := func(m resmap.ResMap, kind, name string) map[string]any {
		for _, r := range m.Resources() {
			if r.GetKind() == kind && r.GetName() == name {
				obj, _ := r.Map()
				return obj
			}
		}
		t.Fatalf("no %s %s", kind, name)
		return nil
	}
	dev := build(t, "kustomize/overlays/dev")
	var st appsv1.StatefulSet
	strict(t, get(dev, "StatefulSet", "expert"), &st)
	if len(st.Spec.Template.Spec.InitContainers) != 1 || st.Namespace != "expertmesh-dev" {
		t.Errorf("dev expert nodes: %d init containers, namespace %q", len(st.Spec.Template.Spec.InitContainers), st.Namespace)
	}
	prod := build(t, "kustomize/overlays/deepseek-v2")
	strict(t, get(prod, "StatefulSet", "expert"), &st)
	vol := st.Spec.Template.Spec.Volumes[0]
	if *st.Spec.Replicas != 8 || vol.PersistentVolumeClaim == nil || vol.PersistentVolumeClaim.ClaimName != "deepseek-v2-weights" {
		t.Errorf("deepseek-v2 expert nodes: %d replicas, volume %+v", *st.Spec.Replicas, vol)
	}
	var d appsv1.Deployment
	strict(t, get(prod, "Deployment", "coordinator"), &d)
	if args := d.Spec.Template.Spec.Containers[0].Args; !slices.Contains(args, "--redundant-experts=32") {
		t.Errorf("deepseek-v2 coordinator args %v", args)
	}
}
